// CPU kernels of the transcoder-block ops: ln_modulate (+ backward) and gated_residual.
//
// Rows are independent, so at::parallel_for splits the M rows into chunks of at least ~16K elements (small problems
// stay on one thread). Each row is converted once into a per-chunk scratch row in the math type (float32 for
// float32/bfloat16/float16, float64 for float64), the two reductions run over that scratch with 16 independent partial
// sums (so the compiler vectorises them without reassociating anything itself), and the outputs are written in one
// pass, rounded once to the output dtype. The row functions are compiled for AVX-512, AVX2 and baseline x86-64, picked
// when the library loads (target_clones, as in attention_cpu.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "transcoder.h"

#include "bigr/clones.h"

namespace bigr {
namespace {

template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int kLanes = 16;               // partial sums per reduction: one AVX-512 vector of float32
constexpr int64_t kMinChunk = 1 << 14;   // elements per parallel task, below which threading costs more than it saves

int64_t row_grain(int64_t D) { return std::max<int64_t>(1, kMinChunk / D); }

template <typename A>
BIGR_INLINE A sum_row(const A* v, int64_t D) {
  A part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= D; j += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += v[j + l];
  A s = 0;
  for (; j < D; ++j) s += v[j];
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

template <typename A>
BIGR_INLINE A dot_row(const A* a, const A* b, int64_t D) {
  A part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= D; j += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[j + l] * b[j + l];
  A s = 0;
  for (; j < D; ++j) s += a[j] * b[j];
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

// One row of each op, in the math type A. Always inlined into the per-type entry points below, which are compiled
// once per instruction set.

// y = (x - mean) * rstd * (1 + scale) + shift; two-pass variance over the scratch copy xc (the row is in cache).
template <typename scalar_t, typename A = math_t<scalar_t>>
BIGR_INLINE void ln_modulate_row(const scalar_t* xr, const scalar_t* sh, const scalar_t* sc, scalar_t* yr, A* xc,
                                 int64_t D, A eps, A* mean, A* rstd) {
  for (int64_t j = 0; j < D; ++j) xc[j] = static_cast<A>(xr[j]);
  const A mu = sum_row(xc, D) / static_cast<A>(D);
  for (int64_t j = 0; j < D; ++j) xc[j] -= mu;
  const A rs = A(1) / std::sqrt(dot_row(xc, xc, D) / static_cast<A>(D) + eps);
  for (int64_t j = 0; j < D; ++j)
    yr[j] = static_cast<scalar_t>(xc[j] * rs * (A(1) + static_cast<A>(sc[j])) + static_cast<A>(sh[j]));
  *mean = mu;
  *rstd = rs;
}

// With xhat = (x - mean) * rstd and g = grad_y * (1 + scale):
//   grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat)), grad_shift = grad_y, grad_scale = grad_y * xhat;
// the last two only when gsh is given (per-row shift and scale). xh and g are scratch rows.
template <typename scalar_t, typename A = math_t<scalar_t>>
BIGR_INLINE void ln_modulate_backward_row(const scalar_t* gr, const scalar_t* xr, const scalar_t* sc, A mu, A rs,
                                          scalar_t* gxr, scalar_t* gsh, scalar_t* gsc, A* xh, A* g, int64_t D) {
  for (int64_t j = 0; j < D; ++j) {
    xh[j] = (static_cast<A>(xr[j]) - mu) * rs;
    g[j] = static_cast<A>(gr[j]) * (A(1) + static_cast<A>(sc[j]));
  }
  const A inv_d = A(1) / static_cast<A>(D);
  const A g_mean = sum_row(g, D) * inv_d, gx_mean = dot_row(g, xh, D) * inv_d;
  for (int64_t j = 0; j < D; ++j) gxr[j] = static_cast<scalar_t>(rs * (g[j] - g_mean - xh[j] * gx_mean));
  if (gsh != nullptr) {
    for (int64_t j = 0; j < D; ++j) {
      gsh[j] = gr[j];
      gsc[j] = static_cast<scalar_t>(static_cast<A>(gr[j]) * xh[j]);
    }
  }
}

template <typename scalar_t, typename A = math_t<scalar_t>>
BIGR_INLINE void gated_residual_row(const scalar_t* xr, const scalar_t* gr, const scalar_t* hr, scalar_t* o,
                                    int64_t D) {
  for (int64_t j = 0; j < D; ++j)
    o[j] = static_cast<scalar_t>(static_cast<A>(xr[j]) + static_cast<A>(gr[j]) * static_cast<A>(hr[j]));
}

// The entry points per dtype, each cloned for AVX-512, AVX2 and baseline x86-64 (picked when the library loads);
// float64 (gradcheck only) calls the templates directly.
#define BIGR_ROW_OPS(T)                                                                                               \
  BIGR_CPU_CLONES void ln_modulate_row_of(const T* xr, const T* sh, const T* sc, T* yr, float* xc, int64_t D,         \
                                          float eps, float* mean, float* rstd) {                                      \
    ln_modulate_row<T>(xr, sh, sc, yr, xc, D, eps, mean, rstd);                                                       \
  }                                                                                                                   \
  BIGR_CPU_CLONES void ln_modulate_backward_row_of(const T* gr, const T* xr, const T* sc, float mu, float rs, T* gxr,  \
                                                   T* gsh, T* gsc, float* xh, float* g, int64_t D) {                  \
    ln_modulate_backward_row<T>(gr, xr, sc, mu, rs, gxr, gsh, gsc, xh, g, D);                                         \
  }                                                                                                                   \
  BIGR_CPU_CLONES void gated_residual_row_of(const T* xr, const T* gr, const T* hr, T* o, int64_t D) {                \
    gated_residual_row<T>(xr, gr, hr, o, D);                                                                          \
  }
BIGR_ROW_OPS(float)
BIGR_ROW_OPS(c10::BFloat16)
BIGR_ROW_OPS(c10::Half)
#undef BIGR_ROW_OPS
void ln_modulate_row_of(const double* xr, const double* sh, const double* sc, double* yr, double* xc, int64_t D,
                        double eps, double* mean, double* rstd) {
  ln_modulate_row<double>(xr, sh, sc, yr, xc, D, eps, mean, rstd);
}
void ln_modulate_backward_row_of(const double* gr, const double* xr, const double* sc, double mu, double rs,
                                 double* gxr, double* gsh, double* gsc, double* xh, double* g, int64_t D) {
  ln_modulate_backward_row<double>(gr, xr, sc, mu, rs, gxr, gsh, gsc, xh, g, D);
}
void gated_residual_row_of(const double* xr, const double* gr, const double* hr, double* o, int64_t D) {
  gated_residual_row<double>(xr, gr, hr, o, D);
}

template <typename scalar_t>
void ln_modulate_rows(const Rows& x, const Rows& shift, const Rows& scale, double eps, int64_t M, int64_t D,
                      scalar_t* y, math_t<scalar_t>* mean, math_t<scalar_t>* rstd) {
  using A = math_t<scalar_t>;
  const scalar_t* xp = x.t.const_data_ptr<scalar_t>();
  const scalar_t* shp = shift.t.const_data_ptr<scalar_t>();
  const scalar_t* scp = scale.t.const_data_ptr<scalar_t>();
  at::parallel_for(0, M, row_grain(D), [&](int64_t lo, int64_t hi) {
    std::vector<A> xc(D);
    for (int64_t r = lo; r < hi; ++r)
      ln_modulate_row_of(xp + r * x.row_stride, shp + r * shift.row_stride, scp + r * scale.row_stride, y + r * D,
                         xc.data(), D, static_cast<A>(eps), mean + r, rstd + r);
  });
}

template <typename scalar_t>
void ln_modulate_backward_rows(const Rows& gy, const Rows& x, const Rows& scale, const math_t<scalar_t>* mean,
                               const math_t<scalar_t>* rstd, int64_t M, int64_t D, scalar_t* gx, scalar_t* gshift,
                               scalar_t* gscale) {
  using A = math_t<scalar_t>;
  const scalar_t* gyp = gy.t.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.t.const_data_ptr<scalar_t>();
  const scalar_t* scp = scale.t.const_data_ptr<scalar_t>();
  at::parallel_for(0, M, row_grain(D), [&](int64_t lo, int64_t hi) {
    std::vector<A> buf(2 * D);
    for (int64_t r = lo; r < hi; ++r)
      ln_modulate_backward_row_of(gyp + r * gy.row_stride, xp + r * x.row_stride, scp + r * scale.row_stride, mean[r],
                                  rstd[r], gx + r * D, gshift ? gshift + r * D : nullptr,
                                  gscale ? gscale + r * D : nullptr, buf.data(), buf.data() + D, D);
  });
}

template <typename scalar_t>
void gated_residual_rows(const Rows& x, const Rows& gate, const Rows& h, int64_t M, int64_t D, scalar_t* out) {
  const scalar_t* xp = x.t.const_data_ptr<scalar_t>();
  const scalar_t* gp = gate.t.const_data_ptr<scalar_t>();
  const scalar_t* hp = h.t.const_data_ptr<scalar_t>();
  at::parallel_for(0, M, row_grain(D), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      gated_residual_row_of(xp + r * x.row_stride, gp + r * gate.row_stride, hp + r * h.row_stride, out + r * D, D);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_modulate_cpu(const at::Tensor& x_in, const at::Tensor& shift_in,
                                                               const at::Tensor& scale_in, double eps) {
  constexpr const char* op = "ln_modulate";
  const RowDims d = check_rows_input(op, x_in);
  check_ln_modulate_pair(op, shift_in, scale_in);
  BIGR_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const Rows x = rows_of(x_in, d.M, d.D);
  const Rows shift = operand_rows(op, "shift", shift_in, x_in, d.M, d.D, true);
  const Rows scale = operand_rows(op, "scale", scale_in, x_in, d.M, d.D, true);
  at::Tensor y = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  const auto lead = x_in.sizes().slice(0, x_in.dim() - 1);
  at::Tensor mean = at::empty(lead, x_in.options().dtype(ln_stats_dtype(x_in.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  if (d.M == 0) return {y, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "ln_modulate_cpu", [&] {
    ln_modulate_rows<scalar_t>(x, shift, scale, eps, d.M, d.D, y.mutable_data_ptr<scalar_t>(),
                               mean.mutable_data_ptr<math_t<scalar_t>>(), rstd.mutable_data_ptr<math_t<scalar_t>>());
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_modulate_backward_cpu(const at::Tensor& gy_in, const at::Tensor& x_in,
                                                                        const at::Tensor& scale_in,
                                                                        const at::Tensor& mean_in,
                                                                        const at::Tensor& rstd_in) {
  constexpr const char* op = "ln_modulate_backward";
  const RowDims d = check_rows_input(op, x_in);
  check_same_shape_dtype(op, "grad_y", gy_in, x_in);
  check_ln_stats(op, x_in, mean_in, rstd_in);
  const Rows x = rows_of(x_in, d.M, d.D), gy = rows_of(gy_in, d.M, d.D);
  const Rows scale = operand_rows(op, "scale", scale_in, x_in, d.M, d.D, true);
  const bool per_row = scale_in.sizes() == x_in.sizes();  // else (D,): column sums, below
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const auto opts = x_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gx = at::empty(x_in.sizes(), opts);
  at::Tensor gshift = at::empty(scale_in.sizes(), opts), gscale = at::empty(scale_in.sizes(), opts);
  if (d.M == 0) return {gx, gshift.zero_(), gscale.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "ln_modulate_backward_cpu", [&] {
    ln_modulate_backward_rows<scalar_t>(gy, x, scale, mean.const_data_ptr<math_t<scalar_t>>(),
                                        rstd.const_data_ptr<math_t<scalar_t>>(), d.M, d.D,
                                        gx.mutable_data_ptr<scalar_t>(),
                                        per_row ? gshift.mutable_data_ptr<scalar_t>() : nullptr,
                                        per_row ? gscale.mutable_data_ptr<scalar_t>() : nullptr);
  });
  if (!per_row) broadcast_ln_modulate_grads(gy.t, x.t, mean, rstd, gshift, gscale);
  return {gx, gshift, gscale};
}

at::Tensor gated_residual_cpu(const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& h_in) {
  constexpr const char* op = "gated_residual";
  const RowDims d = check_rows_input(op, x_in);
  check_same_shape_dtype(op, "gate", gate_in, x_in);
  check_same_shape_dtype(op, "h", h_in, x_in);
  const Rows x = rows_of(x_in, d.M, d.D), gate = rows_of(gate_in, d.M, d.D), h = rows_of(h_in, d.M, d.D);
  at::Tensor out = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (d.M == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "gated_residual_cpu", [&] {
    gated_residual_rows<scalar_t>(x, gate, h, d.M, d.D, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace bigr

TORCH_LIBRARY_IMPL(bigr, CPU, m) {
  m.impl("ln_modulate", &bigr::ln_modulate_cpu);
  m.impl("ln_modulate_backward", &bigr::ln_modulate_backward_cpu);
  m.impl("gated_residual", &bigr::gated_residual_cpu);
}
