// rope_attention: the shape, dtype and device checks shared by the CPU and CUDA kernels, written once.
//
// qkv (B, S, 3, H, d) is the fused projection unflattened; cos/sin (S, d/2) float32 come from rope_2d_table. The
// condition-token quirk of the release (row 0 of cos and sin is zero, so q0 = k0 = 0) lives in the table itself: the
// kernels rotate every row the same way and need no flag.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "bigr/checks.h"

namespace bigr {

struct AttnDims {
  int64_t B, S, H, D;
};

// lse is float32, float64 for float64 inputs (CPU only, there for gradcheck).
inline at::ScalarType attention_lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline AttnDims check_rope_attention_inputs(const char* op, const at::Tensor& qkv, const at::Tensor& cos,
                                            const at::Tensor& sin) {
  BIGR_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, op, ": qkv must be (B, S, 3, H, d), the qkv projection unflattened, "
             "got shape ", qkv.sizes());
  const auto t = qkv.scalar_type();
  BIGR_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || (t == at::kDouble && qkv.is_cpu()), op,
             ": qkv must be float32, bfloat16 or float16 (float64 on CPU only), got ", t, " on ", qkv.device());
  const AttnDims d{qkv.size(0), qkv.size(1), qkv.size(3), qkv.size(4)};
  BIGR_CHECK(d.D > 0 && d.D % 2 == 0, op, ": head dim d=", d.D, " must be even (RoPE turns channel pairs)");
  for (const at::Tensor* cs : {&cos, &sin}) {
    BIGR_CHECK(cs->dim() == 2 && cs->size(0) == d.S && cs->size(1) == d.D / 2, op, ": cos and sin must be (S, d/2) = (",
               d.S, ", ", d.D / 2, "), the rope_2d_table for this sequence, got ", cs->sizes());
    BIGR_CHECK(cs->scalar_type() == at::kFloat, op, ": cos and sin must be float32, got ", cs->scalar_type());
    check_same_device(op, qkv, *cs);
  }
  return d;
}

// key_mask (B, S) bool on qkv's device: True for the keys that take part.
inline void check_key_mask(const char* op, const at::Tensor& key_mask, const AttnDims& d, const at::Tensor& qkv) {
  BIGR_CHECK(key_mask.dim() == 2 && key_mask.size(0) == d.B && key_mask.size(1) == d.S, op,
             ": key_mask must be (B, S) = (", d.B, ", ", d.S, "), one flag per key, got ", key_mask.sizes());
  BIGR_CHECK(key_mask.scalar_type() == at::kBool, op, ": key_mask must be bool (True = the key takes part), got ",
             key_mask.scalar_type());
  check_same_device(op, qkv, key_mask);
}

inline void check_rope_attention_backward_inputs(const char* op, const AttnDims& d, const at::Tensor& qkv,
                                                 const at::Tensor& grad_out, const at::Tensor& out,
                                                 const at::Tensor& lse) {
  for (const at::Tensor* t : {&grad_out, &out}) {
    BIGR_CHECK(t->dim() == 3 && t->size(0) == d.B && t->size(1) == d.S && t->size(2) == d.H * d.D, op,
               ": grad_out and out must be (B, S, H*d) = (", d.B, ", ", d.S, ", ", d.H * d.D, "), got ", t->sizes());
    BIGR_CHECK(t->scalar_type() == qkv.scalar_type(), op, ": grad_out and out must have qkv's dtype ",
               qkv.scalar_type(), ", got ", t->scalar_type());
    check_same_device(op, qkv, *t);
  }
  BIGR_CHECK(lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.H && lse.size(2) == d.S, op,
             ": lse must be (B, H, S) = (", d.B, ", ", d.H, ", ", d.S, "), the forward's, got ", lse.sizes());
  BIGR_CHECK(lse.scalar_type() == attention_lse_dtype(qkv.scalar_type()), op, ": lse must be ",
             attention_lse_dtype(qkv.scalar_type()), " (the forward's), got ", lse.scalar_type());
  check_same_device(op, qkv, lse);
}

// rope_attention_cached: qkv (B, A, 3, H, d) of the A active rows at positions index (B, A) int64, caches
// k_cache, v_cache (B, H, S, d) contiguous in qkv's dtype, cos/sin (S, d/2) float32. Positions are checked against S
// by the CPU kernel only (on CUDA that would need a host sync; the kernels skip out-of-range rows and give NaN there).
struct CachedAttnDims {
  int64_t B, A, H, D, S;
};

inline CachedAttnDims check_rope_attention_cached_inputs(const char* op, const at::Tensor& qkv,
                                                         const at::Tensor& index, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& cos,
                                                         const at::Tensor& sin) {
  BIGR_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, op, ": qkv must be (B, A, 3, H, d), the active rows' qkv "
             "projection unflattened, got shape ", qkv.sizes());
  const auto t = qkv.scalar_type();
  BIGR_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || (t == at::kDouble && qkv.is_cpu()), op,
             ": qkv must be float32, bfloat16 or float16 (float64 on CPU only), got ", t, " on ", qkv.device());
  const int64_t B = qkv.size(0), A = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  BIGR_CHECK(D > 0 && D % 2 == 0, op, ": head dim d=", D, " must be even (RoPE turns channel pairs)");
  BIGR_CHECK(index.dim() == 2 && index.size(0) == B && index.size(1) == A, op,
             ": index must be (B, A) = (", B, ", ", A, "), the positions of qkv's active rows, got shape ",
             index.sizes());
  BIGR_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  check_same_device(op, qkv, index);
  BIGR_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == H && k_cache.size(3) == D, op,
             ": k_cache must be (B, H, S, d) with (B, H, d) = (", B, ", ", H, ", ", D, ") from qkv, got shape ",
             k_cache.sizes());
  const int64_t S = k_cache.size(2);
  BIGR_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ", k_cache.sizes(),
             ", got ", v_cache.sizes());
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    BIGR_CHECK(c->scalar_type() == t, op, ": k_cache and v_cache must have qkv's dtype ", t, ", got ",
               c->scalar_type());
    BIGR_CHECK(c->is_contiguous(), op, ": k_cache and v_cache must be contiguous (they are written in place), got "
               "strides ", c->strides());
    check_same_device(op, qkv, *c);
  }
  BIGR_CHECK(A <= S, op, ": A=", A, " active rows per batch row but the caches hold only S=", S,
             " positions (positions are distinct)");
  for (const at::Tensor* cs : {&cos, &sin}) {
    BIGR_CHECK(cs->dim() == 2 && cs->size(0) == S && cs->size(1) == D / 2, op, ": cos and sin must be (S, d/2) = (",
               S, ", ", D / 2, "), the rope_2d_table for the cached sequence, got ", cs->sizes());
    BIGR_CHECK(cs->scalar_type() == at::kFloat, op, ": cos and sin must be float32, got ", cs->scalar_type());
    check_same_device(op, qkv, *cs);
  }
  // The caches are written in place while qkv, index, cos and sin are read: no shared memory anywhere among them.
  const auto overlap = [](const at::Tensor& a, const at::Tensor& b) {
    const auto st = at::get_overlap_status(a, b);
    return st == at::MemOverlapStatus::Full || st == at::MemOverlapStatus::Partial;
  };
  BIGR_CHECK(!overlap(k_cache, v_cache), op, ": k_cache and v_cache share memory (they are written in place)");
  for (const at::Tensor* c : {&k_cache, &v_cache})
    for (const at::Tensor* in : {&qkv, &index, &cos, &sin})
      BIGR_CHECK(!overlap(*c, *in), op, ": k_cache and v_cache are written in place and must not share memory "
                 "with qkv, index, cos or sin");
  return {B, A, H, D, S};
}

}  // namespace bigr
