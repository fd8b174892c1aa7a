// The model's math in ATen: the transformer (conditions), the transcoder and the B-AE decoder, each op the one the
// Python modules call in the same order (bigr_engine/models/{transformer,transcoder,tokenizer}.py), with the fused
// ops (rope_attention, ln_modulate, gated_residual) through the dispatcher as the Python engine runs them. So the
// two sources of the model's math give the same bits in float32; python_tests/cpp/ checks that they do.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "files.h"

namespace bigr::detail {

using Weights = std::map<std::string, at::Tensor>;

struct Config {   // manifest.json "model": BiGRConfig's fields
  int64_t dim, n_layer, n_head, head_dim, bits, num_tokens, num_classes, ffn_dim, transcoder_blocks, transcoder_dim,
      train_steps, grid;
  bool use_adaln;
  double norm_eps;
  int64_t text_dim = 0, text_tokens = 0;   // a text model's (0: a class model)
  bool is_text() const { return text_dim > 0; }
  int64_t cond_tokens() const { return is_text() ? text_tokens : 1; }   // positions before the image tokens
};

struct Linear {
  at::Tensor weight, bias;   // bias undefined when the layer has none
  at::Tensor operator()(const at::Tensor& x) const { return at::linear(x, weight, bias); }
};

struct TransformerBlock {
  at::Tensor attention_norm, ffn_norm, ada_gss;   // ada_gss undefined without adaLN
  Linear wqkv, wo, w1, w3, w2;
};

struct ResBlock {
  Linear mlp0, mlp2, ada;
};

// The transformer and the transcoder (BiGRNetwork), weights on the pipeline's device.
class Network {
 public:
  Network(const Config& cfg, const Weights& w, const std::string& file, at::Device device);
  const Config& cfg() const { return cfg_; }

  // codes (B, N, K) uint8, mask (B, N) bool (true = masked), labels (B,) int64 ids or (B, C+1) float weights, or
  // for a text model the condition tensor (B, L, 1 + text_dim) float32 (channel 0 the token mask, models.text)
  // -> the transcoder's conditions z (B, N, D) (Transformer.conditions).
  at::Tensor conditions(const at::Tensor& codes, const at::Tensor& mask, const at::Tensor& labels) const;
  // Steps (1..T) -> their time embeddings (S, Hd) (TimestepEmbedder of step - 1).
  at::Tensor time_embedding(const std::vector<int64_t>& steps) const;
  // z (M, D) -> c_embedder(z) (M, Hd).
  at::Tensor condition_projection(const at::Tensor& z) const { return c_embedder_(z); }
  // x_t (M, K) uint8, c (M, Hd) -> flip logits (M, K) (Transcoder.forward_with_condition, fused blocks).
  at::Tensor transcoder_logits(const at::Tensor& x_t, const at::Tensor& c) const;

  // The constant tables, exported by Python (rope_2d_table, schedule_tables).
  at::Tensor rope_cos, rope_sin, k_final, b_final, beta;
  // A text model's null text (L, 1 + text_dim): the empty prompt's condition, CFG's unconditional branch.
  at::Tensor null_text;

 private:
  at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight) const;
  Config cfg_;
  at::Tensor cls_table_, mask_tok_, norm_, pos_embed_;
  Linear tok_embeddings_, ada_ln_, text_proj0_, text_proj2_;   // text_proj: TextProjection's two Linear
  std::vector<TransformerBlock> layers_;
  Linear t_mlp0_, t_mlp2_, x_embedder_, c_embedder_, final_linear_, final_ada_;
  std::vector<ResBlock> blocks_;
};

// The B-AE decoder (Generator with the quantizer's bit embedding), interpreted from the manifest's block list.
class Decoder {
 public:
  Decoder(const files::Json& tokenizer, const Weights& w, const std::string& file, at::Device device);
  // codes (B, N, K) 0/1 -> images (B, C, H, W) float32 in [0, 1] (BinaryAutoencoder.decode).
  at::Tensor decode(const at::Tensor& codes) const;
  int64_t bits, grid, img_size, channels, decode_group;

 private:
  struct Block {
    std::string kind;   // group_norm, conv, res, attn, upsample
    int64_t groups = 32, stride = 1, padding = 0;
    double eps = 1e-6;
    bool project_skip = false;
    std::vector<at::Tensor> t;   // the block's weights, in the order the kind reads them
  };
  at::Tensor run(const Block& b, const at::Tensor& x) const;
  at::Tensor embed_;
  std::vector<Block> blocks_;
};

}  // namespace bigr::detail
