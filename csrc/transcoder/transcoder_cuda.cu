// CUDA kernels of the transcoder-block ops: ln_modulate (+ backward) and gated_residual.
//
// ln_modulate: one warp per row, 8 rows per 256-thread block. Lanes stride over the D channels, the two reductions of
// a row (sum, then centred sum of squares; in the backward sum(g) and sum(g * xhat)) go through warp shuffles, and the
// row is re-read from global memory for each pass (it stays in L1/L2; the transcoder's D is at most a few thousand).
// Math is float32 for float32/bfloat16/float16 (float64 for float64); outputs are rounded once.
// gated_residual: a grid-stride loop over the M * D outputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "transcoder.h"

namespace bigr {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = 32 * kWarpsPerBlock;

template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename scalar_t>
__global__ void ln_modulate_kernel(const scalar_t* __restrict__ x, int64_t sx, const scalar_t* __restrict__ shift,
                                   int64_t ssh, const scalar_t* __restrict__ scale, int64_t ssc,
                                   scalar_t* __restrict__ y, math_t<scalar_t>* __restrict__ mean,
                                   math_t<scalar_t>* __restrict__ rstd, int64_t M, int D, math_t<scalar_t> eps) {
  using A = math_t<scalar_t>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= M) return;  // whole warps leave together: r is per warp
  const scalar_t* xr = x + r * sx;
  A s = 0;
  for (int j = lane; j < D; j += 32) s += static_cast<A>(xr[j]);
  const A mu = warp_sum(s) / static_cast<A>(D);
  A q = 0;
  for (int j = lane; j < D; j += 32) {
    const A c = static_cast<A>(xr[j]) - mu;
    q += c * c;
  }
  const A rs = A(1) / sqrt(warp_sum(q) / static_cast<A>(D) + eps);
  const scalar_t* sh = shift + r * ssh;
  const scalar_t* sc = scale + r * ssc;
  scalar_t* yr = y + r * D;
  for (int j = lane; j < D; j += 32)
    yr[j] = static_cast<scalar_t>((static_cast<A>(xr[j]) - mu) * rs * (A(1) + static_cast<A>(sc[j])) +
                                  static_cast<A>(sh[j]));
  if (lane == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = grad_y * (1 + scale); per-row grad_shift = grad_y
// and grad_scale = grad_y * xhat when gshift is given.
template <typename scalar_t>
__global__ void ln_modulate_backward_kernel(const scalar_t* __restrict__ gy, int64_t sgy,
                                            const scalar_t* __restrict__ x, int64_t sx,
                                            const scalar_t* __restrict__ scale, int64_t ssc,
                                            const math_t<scalar_t>* __restrict__ mean,
                                            const math_t<scalar_t>* __restrict__ rstd, scalar_t* __restrict__ gx,
                                            scalar_t* __restrict__ gshift, scalar_t* __restrict__ gscale, int64_t M,
                                            int D) {
  using A = math_t<scalar_t>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= M) return;
  const scalar_t* xr = x + r * sx;
  const scalar_t* gr = gy + r * sgy;
  const scalar_t* sc = scale + r * ssc;
  const A mu = mean[r], rs = rstd[r];
  A s1 = 0, s2 = 0;
  for (int j = lane; j < D; j += 32) {
    const A g = static_cast<A>(gr[j]) * (A(1) + static_cast<A>(sc[j]));
    s1 += g;
    s2 += g * (static_cast<A>(xr[j]) - mu) * rs;
  }
  const A g_mean = warp_sum(s1) / static_cast<A>(D), gx_mean = warp_sum(s2) / static_cast<A>(D);
  scalar_t* gxr = gx + r * D;
  for (int j = lane; j < D; j += 32) {
    const A xh = (static_cast<A>(xr[j]) - mu) * rs;
    const A gyj = static_cast<A>(gr[j]);
    gxr[j] = static_cast<scalar_t>(rs * (gyj * (A(1) + static_cast<A>(sc[j])) - g_mean - xh * gx_mean));
    if (gshift != nullptr) {
      gshift[r * D + j] = gr[j];
      gscale[r * D + j] = static_cast<scalar_t>(gyj * xh);
    }
  }
}

template <typename scalar_t>
__global__ void gated_residual_kernel(const scalar_t* __restrict__ x, int64_t sx, const scalar_t* __restrict__ gate,
                                      int64_t sg, const scalar_t* __restrict__ h, int64_t sh,
                                      scalar_t* __restrict__ out, int64_t total, int64_t D) {
  using A = math_t<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / D, j = i - r * D;
    out[i] = static_cast<scalar_t>(static_cast<A>(x[r * sx + j]) +
                                   static_cast<A>(gate[r * sg + j]) * static_cast<A>(h[r * sh + j]));
  }
}

unsigned row_blocks(int64_t M) { return static_cast<unsigned>((M + kWarpsPerBlock - 1) / kWarpsPerBlock); }

void check_d_fits(const char* op, int64_t D) {
  BIGR_CHECK(D <= (int64_t{1} << 30), op, ": D=", D, " channels is more than the CUDA kernels handle (2^30)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_modulate_cuda(const at::Tensor& x_in, const at::Tensor& shift_in,
                                                                const at::Tensor& scale_in, double eps) {
  constexpr const char* op = "ln_modulate";
  const RowDims d = check_rows_input(op, x_in);
  check_ln_modulate_pair(op, shift_in, scale_in);
  BIGR_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  check_d_fits(op, d.D);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Rows x = rows_of(x_in, d.M, d.D);
  const Rows shift = operand_rows(op, "shift", shift_in, x_in, d.M, d.D, true);
  const Rows scale = operand_rows(op, "scale", scale_in, x_in, d.M, d.D, true);
  at::Tensor y = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  const auto lead = x_in.sizes().slice(0, x_in.dim() - 1);
  at::Tensor mean = at::empty(lead, x_in.options().dtype(ln_stats_dtype(x_in.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  if (d.M == 0) return {y, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "ln_modulate_cuda", [&] {
    using A = math_t<scalar_t>;
    ln_modulate_kernel<scalar_t><<<row_blocks(d.M), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.t.const_data_ptr<scalar_t>(), x.row_stride, shift.t.const_data_ptr<scalar_t>(), shift.row_stride,
        scale.t.const_data_ptr<scalar_t>(), scale.row_stride, y.mutable_data_ptr<scalar_t>(),
        mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), d.M, static_cast<int>(d.D), static_cast<A>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_modulate_backward_cuda(const at::Tensor& gy_in,
                                                                         const at::Tensor& x_in,
                                                                         const at::Tensor& scale_in,
                                                                         const at::Tensor& mean_in,
                                                                         const at::Tensor& rstd_in) {
  constexpr const char* op = "ln_modulate_backward";
  const RowDims d = check_rows_input(op, x_in);
  check_same_shape_dtype(op, "grad_y", gy_in, x_in);
  check_ln_stats(op, x_in, mean_in, rstd_in);
  check_d_fits(op, d.D);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Rows x = rows_of(x_in, d.M, d.D), gy = rows_of(gy_in, d.M, d.D);
  const Rows scale = operand_rows(op, "scale", scale_in, x_in, d.M, d.D, true);
  const bool per_row = scale_in.sizes() == x_in.sizes();  // else (D,): column sums, below
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const auto opts = x_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gx = at::empty(x_in.sizes(), opts);
  at::Tensor gshift = at::empty(scale_in.sizes(), opts), gscale = at::empty(scale_in.sizes(), opts);
  if (d.M == 0) return {gx, gshift.zero_(), gscale.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "ln_modulate_backward_cuda", [&] {
    using A = math_t<scalar_t>;
    ln_modulate_backward_kernel<scalar_t><<<row_blocks(d.M), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        gy.t.const_data_ptr<scalar_t>(), gy.row_stride, x.t.const_data_ptr<scalar_t>(), x.row_stride,
        scale.t.const_data_ptr<scalar_t>(), scale.row_stride, mean.const_data_ptr<A>(), rstd.const_data_ptr<A>(),
        gx.mutable_data_ptr<scalar_t>(), per_row ? gshift.mutable_data_ptr<scalar_t>() : nullptr,
        per_row ? gscale.mutable_data_ptr<scalar_t>() : nullptr, d.M, static_cast<int>(d.D));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!per_row) broadcast_ln_modulate_grads(gy.t, x.t, mean, rstd, gshift, gscale);
  return {gx, gshift, gscale};
}

at::Tensor gated_residual_cuda(const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& h_in) {
  constexpr const char* op = "gated_residual";
  const RowDims d = check_rows_input(op, x_in);
  check_same_shape_dtype(op, "gate", gate_in, x_in);
  check_same_shape_dtype(op, "h", h_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Rows x = rows_of(x_in, d.M, d.D), gate = rows_of(gate_in, d.M, d.D), h = rows_of(h_in, d.M, d.D);
  at::Tensor out = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = d.M * d.D;
  if (total == 0) return out;
  const int64_t max_blocks = 32 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "gated_residual_cuda", [&] {
    gated_residual_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.t.const_data_ptr<scalar_t>(), x.row_stride, gate.t.const_data_ptr<scalar_t>(), gate.row_stride,
        h.t.const_data_ptr<scalar_t>(), h.row_stride, out.mutable_data_ptr<scalar_t>(), total, d.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace bigr

TORCH_LIBRARY_IMPL(bigr, CUDA, m) {
  m.impl("ln_modulate", &bigr::ln_modulate_cuda);
  m.impl("ln_modulate_backward", &bigr::ln_modulate_backward_cuda);
  m.impl("gated_residual", &bigr::gated_residual_cuda);
}
