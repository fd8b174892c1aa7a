// Every op of the `bigr` namespace: schemas only. Kernels live in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(bigr, m) {
  // Binary codes (..., K) with K <= 64 -> one word per token (int32 for K <= 32, int64 above); bit j = code[..., j].
  m.def("pack_bits(Tensor bits) -> Tensor");
  // Words (...) -> codes (..., K) uint8; inverse of pack_bits.
  m.def("unpack_bits(Tensor words, int K) -> Tensor");
  // rng.py's counter-based hash: (B,) sample indices, (B, ...) counters -> 32-bit values as int64 in [0, 2^32).
  m.def("rng_bits(int seed, Tensor sample_index, int stream, Tensor counters) -> Tensor");
  // The same keys as rng_bits -> float32 uniforms ((bits >> 8) + 0.5) * 2^-24 (rng.uniform_at).
  m.def("rng_uniform(int seed, Tensor sample_index, int stream, Tensor counters) -> Tensor");
  // One transcoder step for (B, n) tokens of K bits, fused: CFG, temperature, flip -> p0, posterior, Bernoulli draw;
  // writes x_(t') into out, or p0 (float32) when t_next <= 0 (the last step).
  m.def("posterior_step(Tensor logits_c, Tensor? logits_u, Tensor x_t, Tensor(a!) out, float cfg, float temperature, "
        "int t, int t_next, Tensor k_final, Tensor b_final, Tensor beta, int seed, Tensor sample_index, int stream, "
        "Tensor token_index, bool greedy) -> ()");
  // Per row, unmask the k[b] most confident (+ Gumbel noise) still-masked candidates index[b] in place: their bits
  // (Bernoulli(p0) or p0 > 0.5) go into codes (B, N, K) and their mask (B, N) entries are cleared.
  m.def("unmask_topk(Tensor p0, Tensor index, Tensor k, Tensor(a!) codes, Tensor(b!) mask, float gumbel_temp, "
        "int seed, Tensor sample_index, int gumbel_stream, int bits_stream, bool deterministic) -> ()");
}
