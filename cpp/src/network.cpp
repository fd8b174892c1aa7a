// The transformer, the transcoder and the decoder in ATen; see network.h for why each op mirrors the Python module.
#include "network.h"

#include <cmath>

#include "ops.h"

namespace bigr::detail {
namespace {

constexpr int64_t kTimeFeatures = 256;   // transcoder.TIME_FEATURES
constexpr double kLnEps = 1e-6;           // transcoder.LN_EPS

struct Reader {
  const Weights& w;
  const std::string& file;
  at::Device device;
  at::Tensor get(const std::string& name) const {
    auto it = w.find(name);
    if (it == w.end())
      throw Error(file + " lacks the tensor " + name + ": it was not written by this bigr-engine's `bigr export cpp`; "
                  "export the model again");
    return it->second.to(device, at::kFloat).contiguous();
  }
  Linear linear(const std::string& name, bool bias = true) const {
    return {get(name + ".weight"), bias ? get(name + ".bias") : at::Tensor()};
  }
};

// y = x * (1 + scale) + shift (ops.reference.modulate).
at::Tensor modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  return x * (1 + scale) + shift;
}

// nn.Conv2d: square stride and padding, as the layers were built.
at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t stride = 1, int64_t pad = 0) {
  return at::conv2d(x, w, b, {stride, stride}, {pad, pad});
}

}  // namespace

Network::Network(const Config& cfg, const Weights& w, const std::string& file, at::Device device) : cfg_(cfg) {
  const Reader r{w, file, device};
  const std::string t = "transformer.", c = "transcoder.";
  if (cfg.is_text()) {
    if (cfg.use_adaln) throw Error(file + ": a text model without adaLN was expected (use_adaln is true); export again");
    text_proj0_ = r.linear(t + "text_proj.mlp.0");
    text_proj2_ = r.linear(t + "text_proj.mlp.2");
    null_text = r.get(t + "null_text");
  } else {
    cls_table_ = r.get(t + "cls_embedding.embedding_table.weight");
  }
  tok_embeddings_ = r.linear(t + "tok_embeddings");
  mask_tok_ = r.get(t + "mask_tok");
  if (cfg.use_adaln) ada_ln_ = r.linear(t + "adaLN.1");
  for (int64_t i = 0; i < cfg.n_layer; ++i) {
    const std::string p = t + "layers." + std::to_string(i) + ".";
    TransformerBlock b;
    b.attention_norm = r.get(p + "attention_norm.weight");
    b.ffn_norm = r.get(p + "ffn_norm.weight");
    if (cfg.use_adaln) b.ada_gss = r.get(p + "ada_gss");
    b.wqkv = r.linear(p + "attention.wqkv", false);
    b.wo = r.linear(p + "attention.wo", false);
    b.w1 = r.linear(p + "feed_forward.w1", false);
    b.w3 = r.linear(p + "feed_forward.w3", false);
    b.w2 = r.linear(p + "feed_forward.w2", false);
    layers_.push_back(std::move(b));
  }
  norm_ = r.get(t + "norm.weight");
  pos_embed_ = r.get(t + "diffusion_pos_embed_learned");
  t_mlp0_ = r.linear(c + "t_embedder.mlp.0");
  t_mlp2_ = r.linear(c + "t_embedder.mlp.2");
  x_embedder_ = r.linear(c + "x_embedder");
  c_embedder_ = r.linear(c + "c_embedder");
  for (int64_t i = 0; i < cfg.transcoder_blocks; ++i) {
    const std::string p = c + "blocks." + std::to_string(i) + ".";
    blocks_.push_back({r.linear(p + "mlp.0"), r.linear(p + "mlp.2"), r.linear(p + "adaLN_modulation.1")});
  }
  final_linear_ = r.linear(c + "final_layer.linear");
  final_ada_ = r.linear(c + "final_layer.adaLN_modulation.1");
  rope_cos = r.get("tables.rope_cos");
  rope_sin = r.get("tables.rope_sin");
  k_final = r.get("tables.k_final");
  b_final = r.get("tables.b_final");
  beta = r.get("tables.beta");
}

// RMSNorm: normalised in float32, cast back, then the weight (transformer.RMSNorm).
at::Tensor Network::rms_norm(const at::Tensor& x, const at::Tensor& weight) const {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor n = xf * at::rsqrt(xf.pow(2).mean({-1}, true) + cfg_.norm_eps);
  return n.to(x.scalar_type()) * weight;
}

at::Tensor Network::conditions(const at::Tensor& codes, const at::Tensor& mask, const at::Tensor& labels) const {
  // Transformer.embed
  at::Tensor tok = tok_embeddings_(codes.to(tok_embeddings_.weight.scalar_type()));
  tok = at::where(mask.unsqueeze(-1), mask_tok_.to(tok.scalar_type()), tok);
  at::Tensor e;
  std::optional<at::Tensor> key_mask;   // a text model's: its padding takes no part as keys
  if (cfg_.is_text()) {
    const at::Tensor text_mask = labels.select(-1, 0) > 0.5;
    // TextProjection: Linear, GELU (tanh), Linear on the embedding channels
    e = text_proj2_(at::gelu(text_proj0_(labels.slice(-1, 1).to(text_proj0_.weight.scalar_type())), "tanh"));
    key_mask = at::cat({text_mask, at::ones({tok.size(0), tok.size(1)}, tok.options().dtype(at::kBool))}, 1);
  } else {
    e = labels.is_floating_point() ? at::matmul(labels.to(cls_table_.scalar_type()), cls_table_).unsqueeze(1)
                                   : at::embedding(cls_table_, labels).unsqueeze(1);
  }
  at::Tensor x = at::cat({e.to(tok.scalar_type()), tok}, 1);
  at::Tensor ada;
  if (cfg_.use_adaln) ada = ada_ln_(at::silu(e)).unflatten(-1, {6, -1});   // (B, 1, 6, D)
  // Block.forward = after_attention(x, attn(qkv(x)))
  for (const TransformerBlock& b : layers_) {
    at::Tensor h = rms_norm(x, b.attention_norm);
    std::vector<at::Tensor> g;
    if (cfg_.use_adaln) {
      g = (ada.slice(2, 0, 2) + b.ada_gss.slice(2, 0, 2)).unbind(2);   // shift_a, scale_a
      h = modulate(h, g[0], g[1]);
    }
    const at::Tensor qkv = b.wqkv(h).unflatten(-1, {3, cfg_.n_head, -1});
    const at::Tensor attn = std::get<0>(ops::rope_attention(qkv, rope_cos, rope_sin, key_mask));
    if (!cfg_.use_adaln) {
      h = x + b.wo(attn);
      const at::Tensor f = rms_norm(h, b.ffn_norm);
      x = h + b.w2(at::silu(b.w1(f)) * b.w3(f));
    } else {
      g = (ada.slice(2, 2) + b.ada_gss.slice(2, 2)).unbind(2);   // gate_a, shift_f, scale_f, gate_f
      h = x + g[0] * b.wo(attn);
      const at::Tensor f = modulate(rms_norm(h, b.ffn_norm), g[1], g[2]);
      x = h + g[3] * b.w2(at::silu(b.w1(f)) * b.w3(f));
    }
  }
  return rms_norm(x, norm_).slice(1, cfg_.cond_tokens()) + pos_embed_;
}

at::Tensor Network::time_embedding(const std::vector<int64_t>& steps) const {
  const auto dev = pos_embed_.device();
  const at::Tensor s = at::tensor(steps, at::TensorOptions().dtype(at::kLong)).to(dev) - 1;
  // timestep_features: [cos, sin] of step * 10000^(-i / half)
  const int64_t half = kTimeFeatures / 2;
  const at::Tensor freqs = at::exp(at::arange(half, at::TensorOptions().dtype(at::kFloat).device(dev)) *
                                   (-std::log(10000.0)) / half);
  const at::Tensor args = s.to(at::kFloat).unsqueeze(1) * freqs.unsqueeze(0);
  const at::Tensor feats = at::cat({at::cos(args), at::sin(args)}, -1);
  return t_mlp2_(at::silu(t_mlp0_(feats.to(t_mlp0_.weight.scalar_type()))));
}

at::Tensor Network::transcoder_logits(const at::Tensor& x_t, const at::Tensor& c) const {
  at::Tensor x = x_embedder_(((x_t - 0.5) * 2).to(c.scalar_type()));
  const at::Tensor cs = at::silu(c);   // every adaLN_modulation starts with SiLU(c)
  for (const ResBlock& b : blocks_) {   // ResBlock.forward with fused=True
    const std::vector<at::Tensor> m = b.ada(cs).chunk(3, -1);   // shift, scale, gate
    const at::Tensor h = b.mlp2(at::silu(b.mlp0(std::get<0>(ops::ln_modulate(x, m[0], m[1], kLnEps)))));
    x = ops::gated_residual(x, m[2], h);
  }
  const std::vector<at::Tensor> m = final_ada_(cs).chunk(2, -1);
  return final_linear_(std::get<0>(ops::ln_modulate(x, m[0], m[1], kLnEps)));
}

// ---------------------------------------------------------------------------------------------- decoder

Decoder::Decoder(const files::Json& tok, const Weights& w, const std::string& file, at::Device device) {
  const Reader r{w, file, device};
  bits = tok.at("bits").as_int();
  grid = tok.at("grid").as_int();
  img_size = tok.at("img_size").as_int();
  channels = tok.at("in_channels").as_int();
  decode_group = tok.at("decode_group").as_int();
  embed_ = r.get("quantize.embed.weight");
  for (const files::Json& j : tok.at("blocks").as_array()) {
    Block b;
    b.kind = j.at("kind").as_string();
    const std::string n = j.at("name").as_string();
    if (j.contains("groups")) b.groups = j.at("groups").as_int();
    if (j.contains("eps")) b.eps = j.at("eps").as_double();
    if (b.kind == "group_norm") {
      b.t = {r.get(n + ".weight"), r.get(n + ".bias")};
    } else if (b.kind == "conv") {
      b.stride = j.at("stride").as_int();
      b.padding = j.at("padding").as_int();
      b.t = {r.get(n + ".weight"), r.get(n + ".bias")};
    } else if (b.kind == "res") {
      b.project_skip = j.at("project_skip").as_bool();
      for (const char* p : {".norm1", ".conv1", ".norm2", ".conv2", ".conv_out"}) {
        b.t.push_back(r.get(n + p + ".weight"));
        b.t.push_back(r.get(n + p + ".bias"));
      }
    } else if (b.kind == "attn") {
      for (const char* p : {".norm", ".q", ".k", ".v", ".proj_out"}) {
        b.t.push_back(r.get(n + p + ".weight"));
        b.t.push_back(r.get(n + p + ".bias"));
      }
    } else if (b.kind == "upsample") {
      b.t = {r.get(n + ".conv.weight"), r.get(n + ".conv.bias")};
    } else {
      throw Error(file + ": unknown decoder block kind '" + b.kind + "' (" + n + "); this bigr-engine is older than "
                  "the export: export the model again with it");
    }
    blocks_.push_back(std::move(b));
  }
}

at::Tensor Decoder::run(const Block& b, const at::Tensor& x) const {
  const auto& t = b.t;
  if (b.kind == "group_norm") return at::group_norm(x, b.groups, t[0], t[1], b.eps);
  if (b.kind == "conv") return conv(x, t[0], t[1], b.stride, b.padding);
  if (b.kind == "res") {
    at::Tensor h = conv(at::silu(at::group_norm(x, b.groups, t[0], t[1], b.eps)), t[2], t[3], 1, 1);
    h = conv(at::silu(at::group_norm(h, b.groups, t[4], t[5], b.eps)), t[6], t[7], 1, 1);
    return h + (b.project_skip ? conv(x, t[8], t[9]) : x);
  }
  if (b.kind == "attn") {   // AttnBlock: single-head attention over the pixels
    const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    const at::Tensor y = at::group_norm(x, b.groups, t[0], t[1], b.eps);
    const auto proj = [&](int i) { return conv(y, t[i], t[i + 1]).flatten(2).transpose(1, 2).unsqueeze(1); };
    const at::Tensor out = at::scaled_dot_product_attention(proj(2), proj(4), proj(6)).select(1, 0);
    return x + conv(out.transpose(1, 2).reshape({B, C, H, W}), t[8], t[9]);
  }
  // upsample: nearest x2, then a 3x3 convolution
  const at::Tensor up = at::upsample_nearest2d(x, std::nullopt, std::vector<double>{2.0, 2.0});
  return conv(up, t[0], t[1], 1, 1);
}

at::Tensor Decoder::decode(const at::Tensor& codes) const {
  const at::Tensor bits_ = codes.transpose(1, 2).reshape({codes.size(0), bits, grid, grid});
  at::Tensor x = at::einsum("bkhw,kd->bdhw", {bits_.to(embed_.scalar_type()), embed_});
  for (const Block& b : blocks_) x = run(b, x);
  return x.clamp(0, 1);
}

}  // namespace bigr::detail
