// The transcoder-block ops (ln_modulate, gated_residual): shape, dtype and device checks and the row views shared by
// the CPU and CUDA kernels, written once.
//
// Every operand is seen as M rows of D channels with unit channel stride and a row stride of its own. The
// adaLN modulation's shift/scale/gate are chunks of one (M, 3D) projection: as views their rows are 3D apart, and
// reading them in place saves a copy per operand per block. A (D,) operand broadcasts over the rows (row stride 0).
#pragma once
#include <ATen/ATen.h>

#include "bigr/checks.h"

namespace bigr {

// Mean and rstd are float32, float64 for float64 inputs (there for gradcheck).
inline at::ScalarType ln_stats_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// One operand as rows: `t` is (M, D) with t.stride(1) == 1 (a view of the caller's tensor where possible, else a
// copy), row_stride the distance between rows in elements (0: one (D,) row broadcast to all M).
struct Rows {
  at::Tensor t;
  int64_t row_stride;
};

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  BIGR_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble, op, ": ", name,
             " must be float32, bfloat16, float16 or float64, got ", s, "; convert it with .float()");
}

// x (..., D) with D >= 1 -> its rows.
inline Rows rows_of(const at::Tensor& x, int64_t M, int64_t D) {
  at::Tensor r = x.reshape({M, D});
  if (r.stride(1) != 1) r = r.contiguous();  // inputs are only read, so any row stride (even 0, from expand) works
  return {r, M > 1 ? r.stride(0) : D};
}

// An operand that must match x: the same shape (per-row values), or (D,) when `allow_broadcast`.
inline Rows operand_rows(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x, int64_t M,
                         int64_t D, bool allow_broadcast) {
  check_float_dtype(op, name, v);
  BIGR_CHECK(v.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
             v.scalar_type(), "; cast it with .to(x.dtype)");
  check_same_device(op, x, v);
  if (allow_broadcast && v.dim() == 1 && v.size(0) == D && x.dim() != 1) {
    const at::Tensor c = v.contiguous();
    return {c.view({1, D}), 0};
  }
  BIGR_CHECK(v.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(),
             allow_broadcast ? " (one row per row of x) or be (D,)" : "", ", got ", v.sizes(),
             allow_broadcast ? "; broadcast other shapes yourself with .expand_as(x)" : "; expand it with .expand_as(x)");
  return rows_of(v, M, D);
}

struct RowDims {
  int64_t M, D;
};

inline RowDims check_rows_input(const char* op, const at::Tensor& x) {
  check_float_dtype(op, "x", x);
  BIGR_CHECK(x.dim() >= 1 && x.size(-1) >= 1, op, ": x must be (..., D) with D >= 1 channels, got shape ", x.sizes());
  const int64_t D = x.size(-1);
  return {D == 0 ? 0 : x.numel() / D, D};
}

// ln_modulate: shift and scale are both x's shape or both (D,), so that the backward (which sees only scale) knows
// the shape of grad_shift.
inline void check_ln_modulate_pair(const char* op, const at::Tensor& shift, const at::Tensor& scale) {
  BIGR_CHECK(shift.sizes() == scale.sizes(), op, ": shift and scale must have the same shape (both x's shape or both "
             "(D,)), got ", shift.sizes(), " and ", scale.sizes());
}

inline void check_ln_stats(const char* op, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd) {
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  for (const at::Tensor* s : {&mean, &rstd}) {
    BIGR_CHECK(s->sizes() == lead, op, ": mean and rstd must be x's leading shape ", lead,
               " (the forward's outputs), got ", s->sizes());
    BIGR_CHECK(s->scalar_type() == ln_stats_dtype(x.scalar_type()), op, ": mean and rstd must be ",
               ln_stats_dtype(x.scalar_type()), " (the forward's outputs), got ", s->scalar_type());
    check_same_device(op, x, *s);
  }
}

inline void check_same_shape_dtype(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x) {
  check_float_dtype(op, name, v);
  BIGR_CHECK(v.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", v.sizes(),
             "; expand it with .expand_as(x)");
  BIGR_CHECK(v.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
             v.scalar_type(), "; cast it with .to(x.dtype)");
  check_same_device(op, x, v);
}

// grad_shift and grad_scale of a (D,) shift and scale: column sums over the rows of grad_y and grad_y * xhat, in the
// math type. Reductions over rows, unlike everything else here, so ATen does them (on either device).
inline void broadcast_ln_modulate_grads(const at::Tensor& gy_rows, const at::Tensor& x_rows, const at::Tensor& mean,
                                        const at::Tensor& rstd, at::Tensor& gshift, at::Tensor& gscale) {
  const auto acc = ln_stats_dtype(x_rows.scalar_type());
  const at::Tensor g = gy_rows.to(acc);
  const at::Tensor xhat = (x_rows.to(acc) - mean.reshape({-1, 1})) * rstd.reshape({-1, 1});
  gshift.copy_(g.sum(0));
  gscale.copy_((g * xhat).sum(0));
}

}  // namespace bigr
