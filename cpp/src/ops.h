// The engine's compiled ops (libbigr_ops.so, csrc/ops.cpp) called through the dispatcher, as Python's torch.ops.bigr
// calls them, so the CPU or CUDA kernel is picked by the tensors' device. The handles are looked up once
// (thread-safe static initialisation); the signatures are the kernels' own (the dispatcher checks them).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace bigr::detail::ops {

template <typename Sig>
inline c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;

inline std::tuple<T, T> rope_attention(const T& qkv, const T& cos, const T& sin, const OptT& key_mask = std::nullopt) {
  static const auto op =
      handle<std::tuple<T, T>(const T&, const T&, const T&, const OptT&)>("bigr::rope_attention");
  return op.call(qkv, cos, sin, key_mask);
}

inline std::tuple<T, T, T> ln_modulate(const T& x, const T& shift, const T& scale, double eps) {
  static const auto op = handle<std::tuple<T, T, T>(const T&, const T&, const T&, double)>("bigr::ln_modulate");
  return op.call(x, shift, scale, eps);
}

inline T gated_residual(const T& x, const T& gate, const T& h) {
  static const auto op = handle<T(const T&, const T&, const T&)>("bigr::gated_residual");
  return op.call(x, gate, h);
}

inline T rng_uniform(int64_t seed, const T& sample_index, int64_t stream, const T& counters) {
  static const auto op = handle<T(int64_t, const T&, int64_t, const T&, const OptT&)>("bigr::rng_uniform");
  return op.call(seed, sample_index, stream, counters, std::nullopt);
}

inline void posterior_step(const T& logits_c, const OptT& logits_u, const T& x_t, T& out, double cfg,
                           double temperature, int64_t t, int64_t t_next, const T& k_final, const T& b_final,
                           const T& beta, int64_t seed, const T& sample_index, int64_t stream, const T& token_index,
                           bool greedy) {
  static const auto op = handle<void(const T&, const OptT&, const T&, T&, double, double, int64_t, int64_t, const T&,
                                     const T&, const T&, int64_t, const T&, int64_t, const T&, bool, const OptT&)>(
      "bigr::posterior_step");
  op.call(logits_c, logits_u, x_t, out, cfg, temperature, t, t_next, k_final, b_final, beta, seed, sample_index,
          stream, token_index, greedy, std::nullopt);
}

inline void unmask_topk(const T& p0, const T& index, const T& k, T& codes, T& mask, double gumbel_temp, int64_t seed,
                        const T& sample_index, int64_t gumbel_stream, int64_t bits_stream, bool deterministic) {
  static const auto op = handle<void(const T&, const T&, const T&, T&, T&, double, int64_t, const T&, int64_t,
                                     int64_t, bool, const OptT&)>("bigr::unmask_topk");
  op.call(p0, index, k, codes, mask, gumbel_temp, seed, sample_index, gumbel_stream, bits_stream, deterministic,
          std::nullopt);
}

}  // namespace bigr::detail::ops
