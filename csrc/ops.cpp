// Every op of the `bigr` namespace: schemas only. Kernels: attention/, pack/, sampling/, transcoder/ (CPU and CUDA).
#include <torch/library.h>

#include "bigr/build_info.h"

TORCH_LIBRARY(bigr, m) {
  // The build: version, torch version, CUDA kernels and archs, compiler, as a JSON object (csrc/build_info.cpp).
  m.def("build_info() -> str", &bigr::build_info_json);
  // Binary codes (..., K) with K <= 64 -> one word per token (int32 for K <= 32, int64 above); bit j = code[..., j].
  m.def("pack_bits(Tensor bits) -> Tensor");
  // Words (...) -> codes (..., K) uint8; inverse of pack_bits.
  m.def("unpack_bits(Tensor words, int K) -> Tensor");
  // rng.py's counter-based hash: (B,) sample indices, (B, ...) counters -> 32-bit values as int64 in [0, 2^32).
  m.def("rng_bits(int seed, Tensor sample_index, int stream, Tensor counters, Tensor? seeds=None) -> Tensor");
  // seeds (B,) int64, optional: per-row seeds in place of `seed` (row b gets exactly what seed=seeds[b] gives it);
  // posterior_step and unmask_topk take them too.
  // The same keys as rng_bits -> float32 uniforms ((bits >> 8) + 0.5) * 2^-24 (rng.uniform_at).
  m.def("rng_uniform(int seed, Tensor sample_index, int stream, Tensor counters, Tensor? seeds=None) -> Tensor");
  // One transcoder step for (B, n) tokens of K bits, fused: CFG, temperature, flip -> p0, posterior, Bernoulli draw;
  // writes x_(t') into out, or p0 (float32) when t_next <= 0 (the last step).
  m.def("posterior_step(Tensor logits_c, Tensor? logits_u, Tensor x_t, Tensor(a!) out, float cfg, float temperature, "
        "int t, int t_next, Tensor k_final, Tensor b_final, Tensor beta, int seed, Tensor sample_index, int stream, "
        "Tensor token_index, bool greedy, Tensor? seeds=None) -> ()");
  // Per row, unmask the k[b] most confident (+ Gumbel noise) still-masked candidates index[b] in place: their bits
  // (Bernoulli(p0) or p0 > 0.5) go into codes (B, N, K) and their mask (B, N) entries are cleared.
  m.def("unmask_topk(Tensor p0, Tensor index, Tensor k, Tensor(a!) codes, Tensor(b!) mask, float gumbel_temp, "
        "int seed, Tensor sample_index, int gumbel_stream, int bits_stream, bool deterministic, Tensor? seeds=None) -> ()");
  // Bidirectional softmax attention with 2D RoPE: qkv (B, S, 3, H, d) float32/bfloat16/float16 (float64 on CPU),
  // cos/sin (S, d/2) float32 from rope_2d_table (row 0 zero: the condition-token quirk) -> out (B, S, H*d) in qkv's
  // dtype and the log-sum-exp of the scaled logits lse (B, H, S) float32 (float64 for float64), for the backward.
  // key_mask (B, S) bool, optional: True for the keys that take part (SDPA's convention; False on a prompt's padding).
  // Every row needs at least one kept key (the CPU kernel checks; on CUDA such a row averages all values).
  m.def("rope_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor? key_mask=None) -> (Tensor out, Tensor lse)");
  // Its backward: grad_out (B, S, H*d) and the forward's out and lse -> grad_qkv (B, S, 3, H, d) (dq, dk turned back
  // through the rotation, dv).
  m.def("rope_attention_backward(Tensor grad_out, Tensor qkv, Tensor cos, Tensor sin, Tensor out, Tensor lse, "
        "Tensor? key_mask=None) -> Tensor");
  // Attention of A active rows against a persistent K/V cache (the state reuse of sampling): qkv (B, A, 3, H, d)
  // fresh projections at positions index (B, A) int64 (distinct per row, in [0, S)), k_cache and v_cache (B, H, S, d)
  // contiguous in qkv's dtype (keys stored rotated), cos/sin (S, d/2) float32. Writes the rotated k and the v of the
  // active rows into the caches at their positions (in place), then each rotated active query attends over all S
  // cached keys -> out (B, A, H*d) in qkv's dtype. Inference only (no backward). key_mask (B, S) bool, optional: as
  // rope_attention's, over the cached positions (a text model's padding takes no part); every row keeps one key.
  m.def("rope_attention_cached(Tensor qkv, Tensor index, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, "
        "Tensor sin, Tensor? key_mask=None) -> Tensor");
  // The transcoder block's LayerNorm (no affine) + adaLN modulation, fused: x (..., D), shift and scale both x's shape
  // (per-row) or both (D,) -> y = (x - mean) * rstd * (1 + scale) + shift in x's dtype, and mean, rstd (...) float32
  // (float64 for float64 x) for the backward.
  m.def("ln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  // Its backward -> grad_x (x's shape), grad_shift and grad_scale (scale's shape).
  m.def("ln_modulate_backward(Tensor grad_y, Tensor x, Tensor scale, Tensor mean, Tensor rstd) "
        "-> (Tensor grad_x, Tensor grad_shift, Tensor grad_scale)");
  // The block's gated residual x + gate * h, all three the same shape, math in float32 (float64 for float64).
  m.def("gated_residual(Tensor x, Tensor gate, Tensor h) -> Tensor");
}
