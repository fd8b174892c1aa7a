// The generation loop; see sampling.h. Python's names are kept (engine._rounds, transcode_masked_ops).
#include "sampling.h"

#include <cmath>

#include "ops.h"

namespace bigr::detail {
namespace {

// ops/rng.py's stream kinds and stream(kind, iteration, step).
constexpr int64_t kTranscoderInit = 0, kTranscoderStep = 1, kGumbel = 2, kTokenBits = 3;

int64_t stream(int64_t kind, int64_t iteration, int64_t step = 0) {
  if (!(0 <= iteration && iteration < 4096 && 0 <= step && step < 4096))
    throw Error("iteration and step indices must be below 4096");
  return (kind << 24) | (iteration << 12) | step;
}

// masked_after with the cosine schedule: floor(cos(pi/2 * (s+1)/iters) * n).
int64_t masked_after(int64_t s, int64_t iters, int64_t n) {
  const double ratio = static_cast<double>(s + 1) / static_cast<double>(iters);
  return static_cast<int64_t>(std::floor(std::cos(M_PI / 2 * ratio) * static_cast<double>(n)));
}

double cfg_at(const SamplingOptions& o, double ratio) {
  return o.cfg_schedule == "constant" ? o.cfg : 1 + (o.cfg - 1) * ratio;
}

double gumbel_at(const SamplingOptions& o, double ratio) {
  if (o.greedy) return 0.0;
  if (o.gumbel_schedule == "down") return o.gumbel * (1 - ratio);
  if (o.gumbel_schedule == "up") return o.gumbel * ratio;
  return o.gumbel;
}

// p0 (B, n, K) float32 for the n masked tokens per row at positions token_index (B, n); cz: c_embedder(z) of the
// [cond; uncond] rows (branches * B * n, Hd); temb (S, Hd). x ping-pongs between two uint8 buffers.
at::Tensor transcode_masked(const Network& net, const at::Tensor& cz, const at::Tensor& temb,
                            const std::vector<int64_t>& steps, const Round& r, bool use_cfg, const SamplingOptions& o,
                            const at::Tensor& sample_index, const at::Tensor& token_index) {
  const int64_t B = token_index.size(0), n = token_index.size(1), K = net.cfg().bits;
  const int64_t branches = use_cfg ? 2 : 1;
  const at::Tensor counters = token_index.unsqueeze(-1) * K + at::arange(K, token_index.options());
  at::Tensor x = o.greedy ? at::zeros(counters.sizes(), counters.options().dtype(at::kByte))
                          : (ops::rng_uniform(o.seed, sample_index, stream(kTranscoderInit, r.iteration), counters) < 0.5)
                                .to(at::kByte);
  at::Tensor x_next = at::empty_like(x);
  at::Tensor p0 = at::empty({B, n, K}, cz.options().dtype(at::kFloat));
  const int64_t S = static_cast<int64_t>(steps.size());
  for (int64_t j = 0; j < S; ++j) {
    const at::Tensor logits = net.transcoder_logits(x.view({B * n, K}).repeat({branches, 1}), cz + temb[j]);
    std::optional<at::Tensor> l_u;
    at::Tensor l_c = logits;
    if (use_cfg) {
      const auto halves = logits.chunk(2);
      l_c = halves[0];
      l_u = halves[1];
    }
    const bool last = j == S - 1;
    ops::posterior_step(l_c, l_u, x, last ? p0 : x_next, r.cfg, o.temperature, steps[j], last ? 0 : steps[j + 1],
                        net.k_final, net.b_final, net.beta, o.seed, sample_index,
                        stream(kTranscoderStep, r.iteration, j), token_index, o.greedy);
    std::swap(x, x_next);
  }
  return p0;
}

}  // namespace

std::vector<int64_t> inference_steps(int64_t T, int64_t S) {
  std::vector<int64_t> steps;
  if (S == T) {
    for (int64_t t = T; t >= 1; --t) steps.push_back(t);
    return steps;
  }
  // floor(linspace(0, 1, S) * (T - 1)) + 1 in float64, as models.transcoder.inference_steps, descending.
  const at::Tensor idx = at::floor(at::linspace(0, 1, S, at::TensorOptions().dtype(at::kDouble)) * (T - 1)).to(at::kLong);
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t i = S - 1; i >= 0; --i) steps.push_back(p[i] + 1);
  return steps;
}

std::vector<Round> rounds_for(const SamplingOptions& o, int64_t N) {
  std::vector<Round> out;
  int64_t n = N;
  for (int64_t s = 0; s < o.iters; ++s) {
    const double ratio = static_cast<double>(s + 1) / static_cast<double>(o.iters);
    const int64_t keep = masked_after(s, o.iters, N);
    if (n > 0) out.push_back({s, n, n - keep, cfg_at(o, ratio), gumbel_at(o, ratio)});
    n = keep;
  }
  if (n > 0) out.push_back({o.iters, n, n, o.cfg, 0.0});   // one more pass fills whatever is left
  return out;
}

at::Tensor generate(const Network& net, const at::Tensor& labels, const at::Tensor& sample_index,
                    const SamplingOptions& o) {
  const Config& cfg = net.cfg();
  const int64_t B = labels.size(0), N = cfg.num_tokens, K = cfg.bits;
  const auto dev = labels.device();
  const bool use_cfg = o.cfg != 1.0;
  const int64_t branches = use_cfg ? 2 : 1;
  // prepare_batch: the null-class rows (ids, or one-hot weights in the labels' dtype), or a text model's null text
  at::Tensor null;
  if (cfg.is_text()) {
    null = net.null_text.to(labels.scalar_type()).expand({B, -1, -1});
  } else {
    null = at::full({B}, cfg.num_classes, at::TensorOptions().dtype(at::kLong).device(dev));
    if (labels.is_floating_point()) null = at::one_hot(null, cfg.num_classes + 1).to(labels.scalar_type());
  }
  const at::Tensor cond_labels = use_cfg ? at::cat({labels, null}) : labels;
  const std::vector<int64_t> steps = inference_steps(cfg.train_steps, o.steps);
  const at::Tensor temb = net.time_embedding(steps);
  at::Tensor codes = at::zeros({B, N, K}, at::TensorOptions().dtype(at::kByte).device(dev));
  at::Tensor mask = at::ones({B, N}, at::TensorOptions().dtype(at::kBool).device(dev));
  for (const Round& r : rounds_for(o, N)) {
    // the masked positions, ascending (sampling.reuse.first_true)
    const at::Tensor idx = std::get<1>(at::sort(mask.to(at::kByte), true, 1, true)).slice(1, 0, r.n);
    at::Tensor z = net.conditions(codes.repeat({branches, 1, 1}), mask.repeat({branches, 1}), cond_labels);
    z = at::gather(z, 1, idx.repeat({branches, 1}).unsqueeze(-1).expand({-1, -1, z.size(-1)}));
    const at::Tensor cz = net.condition_projection(z.reshape({branches * B * r.n, -1}));
    const at::Tensor p0 = transcode_masked(net, cz, temb, steps, r, use_cfg, o, sample_index, idx);
    const at::Tensor k = at::full({B}, r.count, at::TensorOptions().dtype(at::kLong).device(dev));
    ops::unmask_topk(p0, idx, k, codes, mask, r.gumbel, o.seed, sample_index, stream(kGumbel, r.iteration),
                     stream(kTokenBits, r.iteration), o.deterministic || o.greedy);
  }
  return codes;
}

}  // namespace bigr::detail
