// CUDA kernels: rope_attention forward and backward (bidirectional softmax attention with 2D RoPE on q and k).
//
// Flash-style: one CTA of 4 warps owns 64 rows of one (batch, head) and walks the other side in tiles staged in
// shared memory; RoPE is applied while q and k tiles are loaded (float32 math, rounded to the input dtype as
// transformer.apply_rope does), and no S x S matrix is ever stored. Sequence tails are zero-filled on load and masked
// in the logits, so any S works.
//   bfloat16 / float16: tensor cores through mma.sync.m16n8k16 (sm80+), float32 accumulation, each warp owning 16 rows.
//     The accumulator layout of one mma is the operand layout of the next, so probabilities go from the QK^T
//     accumulators straight into the PV mma (rounded to the input dtype, as in FlashAttention-2).
//   float32: a SIMT path; D/32 neighbouring threads share a row, thread t holding channels t, t + D/32, ...
// Forward: online softmax in the log2 domain; writes out and lse = ln(sum exp(logits)) (natural log).
// Backward: two kernels that both recompute p = exp(logits - lse) from the saved lse: one owns query rows and makes dq,
// the other owns key rows and makes dk and dv, so no two CTAs write the same row (no atomics). delta = rowsum(dO * O)
// comes from ATen beforehand. dq and dk are turned back through the rotation in registers before the store.
// Head dims 64 and 128 are instantiated per dtype.
// rope_attention_cached (the active rows against a K/V cache): a simple float32 SIMT kernel at the end of the file.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention.h"

namespace bigr {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kThreads = 128;  // 4 warps per CTA in every kernel
constexpr int kRows = 64;      // rows per CTA in the tensor-core kernels (16 per warp)

// ---------------------------------------------------------------------------------------------------------------
// Element helpers for the 16-bit types.
template <typename T>
struct Elem;
template <>
struct Elem<__half> {
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static uint32_t bits(__half x) { return __half_as_ushort(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static uint32_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
};

// Two values in one 32-bit register, the lower column in the low half (the mma operand convention).
template <typename T>
__device__ __forceinline__ uint32_t pack_elems(T lo, T hi) {
  return Elem<T>::bits(lo) | (Elem<T>::bits(hi) << 16);
}
template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi) {
  return pack_elems<T>(Elem<T>::from_float(lo), Elem<T>::from_float(hi));
}
__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// x0 cos - x1 sin and x1 cos + x0 sin without fused multiply-adds, rounded like torch's separate ops.
__device__ __forceinline__ float rot0(float x0, float x1, float c, float s) {
  return __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
}
__device__ __forceinline__ float rot1(float x0, float x1, float c, float s) {
  return __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
}

// D (16x8, f32) += A (16x16, row-major) * B (16x8, column-major). With g = lane / 4 and t = lane % 4:
//   a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..];
//   b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g];
//   d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1].
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// Operand loads from a shared tile M with row stride LDS elements (LDS = D + 8 keeps these conflict-free).
// A = M[row0 .. row0+16)[col0 .. col0+16).
template <typename T, int LDS>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* m, int row0, int col0, int g, int t) {
  const T* p = m + (row0 + g) * LDS + col0 + 2 * t;
  a[0] = ld32(p);
  a[1] = ld32(p + 8 * LDS);
  a[2] = ld32(p + 8);
  a[3] = ld32(p + 8 * LDS + 8);
}
// B[k][n] = M[n0 + n][k0 + k]: the tile holds B's columns as rows (k contiguous), e.g. K for Q K^T.
template <typename T, int LDS>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[2], const T* m, int n0, int k0, int g, int t) {
  const T* p = m + (n0 + g) * LDS + k0 + 2 * t;
  b[0] = ld32(p);
  b[1] = ld32(p + 8);
}
// B[k][n] = M[k0 + k][n0 + n]: the tile holds B's rows as rows (n contiguous), e.g. V for P V.
template <typename T, int LDS>
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[2], const T* m, int k0, int n0, int g, int t) {
  const T* p = m + (k0 + 2 * t) * LDS + n0 + g;
  b[0] = pack_elems<T>(p[0], p[LDS]);
  b[1] = pack_elems<T>(p[8 * LDS], p[9 * LDS]);
}
// Accumulators of two neighbouring 16x8 tiles (columns c0 .. c0+16) as the A operand of the next mma.
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack_floats<T>(lo[0], lo[1]);
  a[1] = pack_floats<T>(lo[2], lo[3]);
  a[2] = pack_floats<T>(hi[0], hi[1]);
  a[3] = pack_floats<T>(hi[2], hi[3]);
}

// Rows [s0, s0 + ROWS) of one (batch, head) slice (row s at src + s * stride, D contiguous elements, 16-byte aligned)
// into a shared tile with row stride D + 8, turned by RoPE when cos is given; rows >= S are zero.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t stride, int s0, int S, const float* cos,
                                          const float* sin) {
  constexpr int LDS = D + 8, VPR = D / 8;  // 16-byte vectors per row
  for (int i = threadIdx.x; i < ROWS * VPR; i += blockDim.x) {
    const int r = i / VPR, cv = i % VPR, s = s0 + r;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (s < S) {
      v = *reinterpret_cast<const uint4*>(src + s * stride + cv * 8);
      if (cos != nullptr) {
        T e[8];
        memcpy(e, &v, sizeof v);
        const float* c = cos + static_cast<int64_t>(s) * (D / 2) + cv * 4;
        const float* sn = sin + static_cast<int64_t>(s) * (D / 2) + cv * 4;
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const float x0 = Elem<T>::to_float(e[2 * p]), x1 = Elem<T>::to_float(e[2 * p + 1]);
          e[2 * p] = Elem<T>::from_float(rot0(x0, x1, c[p], sn[p]));
          e[2 * p + 1] = Elem<T>::from_float(rot1(x0, x1, c[p], sn[p]));
        }
        memcpy(&v, e, sizeof v);
      }
    }
    *reinterpret_cast<uint4*>(tile + r * LDS + cv * 8) = v;
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// Where the (batch, head) slices live. qkv rows: base(b, h, which) + s * sS; grad_out and the output: contiguous.
struct QkvStrides {
  int64_t sB, sS, s3, sH;
};

// The key mask (rope_attention's key_mask, B x S bytes; null: every key takes part). A masked key's logit is finite
// and far below any real one: a tile of only masked keys keeps the running max finite (no inf - inf), and the next
// tile with a kept key rescales its weights to exactly 0 (exp2f underflows). The backward gives it p = 0.
constexpr float kMaskedLogit = -1e30f;
__device__ __forceinline__ bool kept(const uint8_t* __restrict__ keep, int b, int S, int key) {
  return keep == nullptr || key >= S || keep[static_cast<int64_t>(b) * S + key] != 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core kernels (bfloat16, float16).

// Grid (ceil(S / 64), H, B). Shared: K and V tiles (64 x (D + 8)); the Q tile passes through the K tile first.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fwd_tc_kernel(const T* __restrict__ qkv, QkvStrides st,
                                                          const float* __restrict__ cos, const float* __restrict__ sin,
                                                          T* __restrict__ out, float* __restrict__ lse, int S, int H,
                                                          float scale_log2, const uint8_t* __restrict__ keep) {
  constexpr int BN = 64, LDS = D + 8, KC = D / 16, ND = D / 8, NS = BN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BN * LDS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kRows;
  const T* base = qkv + b * st.sB + h * st.sH;

  load_tile<T, D, kRows>(sK, base, st.sS, q0, S, cos, sin);
  __syncthreads();
  uint32_t qf[KC][4];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) load_a<T, LDS>(qf[kc], sK, warp * 16, kc * 16, g, t);
  __syncthreads();

  float o[ND][4];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8; l is this thread's partial sum

  for (int k0 = 0; k0 < S; k0 += BN) {
    load_tile<T, D, BN>(sK, base + st.s3, st.sS, k0, S, cos, sin);
    load_tile<T, D, BN>(sV, base + 2 * st.s3, st.sS, k0, S, nullptr, nullptr);
    __syncthreads();
    float sc[NS][4];
#pragma unroll
    for (int nt = 0; nt < NS; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
#pragma unroll
      for (int nt = 0; nt < NS; ++nt) {
        uint32_t bf[2];
        load_b_rows<T, LDS>(bf, sK, nt * 8, kc * 16, g, t);
        mma16816<T>(sc[nt], qf[kc], bf);
      }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = k0 + nt * 8 + 2 * t + (e & 1);
        const float v = col < S ? (kept(keep, b, S, col) ? sc[nt][e] * scale_log2 : kMaskedLogit) : -INFINITY;
        sc[nt][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    float corr[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // every tile has a valid column, so the new max is finite
      const float m_new = fmaxf(m[i], quad_max(mx[i]));
      corr[i] = exp2f(m[i] - m_new);  // 0 on the first tile
      m[i] = m_new;
      l[i] *= corr[i];
    }
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[nt][e] = exp2f(sc[nt][e] - m[e >> 1]);
        l[e >> 1] += sc[nt][e];
      }
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nd][e] *= corr[e >> 1];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      acc_to_a<T>(pa, sc[2 * kk], sc[2 * kk + 1]);
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        uint32_t bf[2];
        load_b_cols<T, LDS>(bf, sV, kk * 16, nd * 8, g, t);
        mma16816<T>(o[nd], pa, bf);
      }
    }
    __syncthreads();  // the next iteration overwrites sK and sV
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float li = quad_sum(l[i]);
    const int s = q0 + warp * 16 + g + 8 * i;
    if (s < S) {
      const float inv = 1.f / li;
      T* dst = out + ((static_cast<int64_t>(b) * S + s) * H + h) * D + 2 * t;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd)
        *reinterpret_cast<uint32_t*>(dst + nd * 8) = pack_floats<T>(o[nd][2 * i] * inv, o[nd][2 * i + 1] * inv);
      if (t == 0) lse[(static_cast<int64_t>(b) * H + h) * S + s] = (m[i] + log2f(li)) * kLn2;
    }
  }
}

// dq: grid (ceil(S / 64), H, B), CTA rows = queries. Shared: Q and dO tiles (resident), K and V tiles (per step).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dq_tc_kernel(const T* __restrict__ qkv, QkvStrides st,
                                                             const float* __restrict__ cos,
                                                             const float* __restrict__ sin,
                                                             const T* __restrict__ gout,
                                                             const float* __restrict__ lse,
                                                             const float* __restrict__ delta, T* __restrict__ grad,
                                                             int S, int H, float scale, float scale_log2,
                                                             const uint8_t* __restrict__ keep) {
  constexpr int BN = 64, LDS = D + 8, KC = D / 16, ND = D / 8, NS = BN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sO = sQ + kRows * LDS;  // dO
  T* sK = sO + kRows * LDS;
  T* sV = sK + BN * LDS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kRows;
  const T* base = qkv + b * st.sB + h * st.sH;
  const int64_t HD = static_cast<int64_t>(H) * D;
  const int64_t bh = static_cast<int64_t>(b) * H + h;

  load_tile<T, D, kRows>(sQ, base, st.sS, q0, S, cos, sin);
  load_tile<T, D, kRows>(sO, gout + static_cast<int64_t>(b) * S * HD + h * D, HD, q0, S, nullptr, nullptr);
  float lse2[2], dl[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int s = q0 + warp * 16 + g + 8 * i;
    lse2[i] = s < S ? lse[bh * S + s] * kLog2e : 0.f;
    dl[i] = s < S ? delta[bh * S + s] : 0.f;
  }
  float dq[ND][4];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.f;

  for (int k0 = 0; k0 < S; k0 += BN) {
    load_tile<T, D, BN>(sK, base + st.s3, st.sS, k0, S, cos, sin);
    load_tile<T, D, BN>(sV, base + 2 * st.s3, st.sS, k0, S, nullptr, nullptr);
    __syncthreads();
    float p[NS][4], dp[NS][4];
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      uint32_t aq[4], ao[4];
      load_a<T, LDS>(aq, sQ, warp * 16, kc * 16, g, t);
      load_a<T, LDS>(ao, sO, warp * 16, kc * 16, g, t);
#pragma unroll
      for (int nt = 0; nt < NS; ++nt) {
        uint32_t bk[2], bv[2];
        load_b_rows<T, LDS>(bk, sK, nt * 8, kc * 16, g, t);
        mma16816<T>(p[nt], aq, bk);  // logits
        load_b_rows<T, LDS>(bv, sV, nt * 8, kc * 16, g, t);
        mma16816<T>(dp[nt], ao, bv);  // dP = dO V^T
      }
    }
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = k0 + nt * 8 + 2 * t + (e & 1);
        const float pe = col < S && kept(keep, b, S, col) ? exp2f(p[nt][e] * scale_log2 - lse2[e >> 1]) : 0.f;
        p[nt][e] = pe * (dp[nt][e] - dl[e >> 1]);  // dS
      }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t da[4];
      acc_to_a<T>(da, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        uint32_t bk[2];
        load_b_cols<T, LDS>(bk, sK, kk * 16, nd * 8, g, t);
        mma16816<T>(dq[nd], da, bk);
      }
    }
    __syncthreads();
  }

  // dq' = scale * dS K, turned back through the rotation: columns 2t, 2t+1 of each 8-wide tile are one RoPE pair.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int s = q0 + warp * 16 + g + 8 * i;
    if (s < S) {
      T* dst = grad + (static_cast<int64_t>(b) * S + s) * 3 * HD + h * D;
      const float* c = cos + static_cast<int64_t>(s) * (D / 2);
      const float* sn = sin + static_cast<int64_t>(s) * (D / 2);
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        const int j = nd * 4 + t;
        const float g0 = dq[nd][2 * i] * scale, g1 = dq[nd][2 * i + 1] * scale;
        *reinterpret_cast<uint32_t*>(dst + 2 * j) = pack_floats<T>(g0 * c[j] + g1 * sn[j], g1 * c[j] - g0 * sn[j]);
      }
    }
  }
}

// dk, dv: grid (ceil(S / 64), H, B), CTA rows = keys. Shared: K and V tiles (resident), Q and dO tiles of BN queries
// with their lse and delta (per step).
template <typename T, int D, int BN>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_tc_kernel(const T* __restrict__ qkv, QkvStrides st,
                                                               const float* __restrict__ cos,
                                                               const float* __restrict__ sin,
                                                               const T* __restrict__ gout,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ delta,
                                                               T* __restrict__ grad, int S, int H, float scale,
                                                               float scale_log2, const uint8_t* __restrict__ keep) {
  constexpr int LDS = D + 8, KC = D / 16, ND = D / 8, NS = BN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kRows * LDS;
  T* sQ = sV + kRows * LDS;
  T* sO = sQ + BN * LDS;  // dO
  float* sL = reinterpret_cast<float*>(sO + BN * LDS);  // lse * log2(e) of the step's queries
  float* sD = sL + BN;                                  // delta of the step's queries
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y, k0 = blockIdx.x * kRows;
  const T* base = qkv + b * st.sB + h * st.sH;
  const int64_t HD = static_cast<int64_t>(H) * D;
  const int64_t bh = static_cast<int64_t>(b) * H + h;
  const T* go = gout + static_cast<int64_t>(b) * S * HD + h * D;

  load_tile<T, D, kRows>(sK, base + st.s3, st.sS, k0, S, cos, sin);
  load_tile<T, D, kRows>(sV, base + 2 * st.s3, st.sS, k0, S, nullptr, nullptr);
  float dk[ND][4], dv[ND][4];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.f;

  for (int q0 = 0; q0 < S; q0 += BN) {
    load_tile<T, D, BN>(sQ, base, st.sS, q0, S, cos, sin);
    load_tile<T, D, BN>(sO, go, HD, q0, S, nullptr, nullptr);
    for (int i = threadIdx.x; i < BN; i += blockDim.x) {
      const int s = q0 + i;
      sL[i] = s < S ? lse[bh * S + s] * kLog2e : 0.f;
      sD[i] = s < S ? delta[bh * S + s] : 0.f;
    }
    __syncthreads();
    float p[NS][4], dp[NS][4];  // transposed: rows are this warp's keys, columns the step's queries
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      uint32_t ak[4], av[4];
      load_a<T, LDS>(ak, sK, warp * 16, kc * 16, g, t);
      load_a<T, LDS>(av, sV, warp * 16, kc * 16, g, t);
#pragma unroll
      for (int nt = 0; nt < NS; ++nt) {
        uint32_t bq[2], bo[2];
        load_b_rows<T, LDS>(bq, sQ, nt * 8, kc * 16, g, t);
        mma16816<T>(p[nt], ak, bq);  // logits^T = K Q^T
        load_b_rows<T, LDS>(bo, sO, nt * 8, kc * 16, g, t);
        mma16816<T>(dp[nt], av, bo);  // dP^T = V dO^T
      }
    }
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int jj = nt * 8 + 2 * t + (e & 1);
        const float pe = q0 + jj < S && kept(keep, b, S, k0 + warp * 16 + g + 8 * (e >> 1))
                             ? exp2f(p[nt][e] * scale_log2 - sL[jj]) : 0.f;   // rows are keys
        p[nt][e] = pe;
        dp[nt][e] = pe * (dp[nt][e] - sD[jj]);  // dS^T
      }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4], da[4];
      acc_to_a<T>(pa, p[2 * kk], p[2 * kk + 1]);
      acc_to_a<T>(da, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        uint32_t bo[2], bq[2];
        load_b_cols<T, LDS>(bo, sO, kk * 16, nd * 8, g, t);
        mma16816<T>(dv[nd], pa, bo);  // dV += P^T dO
        load_b_cols<T, LDS>(bq, sQ, kk * 16, nd * 8, g, t);
        mma16816<T>(dk[nd], da, bq);  // dK' += dS^T Q
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int s = k0 + warp * 16 + g + 8 * i;
    if (s < S) {
      T* dst = grad + (static_cast<int64_t>(b) * S + s) * 3 * HD + h * D;
      const float* c = cos + static_cast<int64_t>(s) * (D / 2);
      const float* sn = sin + static_cast<int64_t>(s) * (D / 2);
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        const int j = nd * 4 + t;
        const float g0 = dk[nd][2 * i] * scale, g1 = dk[nd][2 * i + 1] * scale;
        *reinterpret_cast<uint32_t*>(dst + HD + 2 * j) = pack_floats<T>(g0 * c[j] + g1 * sn[j], g1 * c[j] - g0 * sn[j]);
        *reinterpret_cast<uint32_t*>(dst + 2 * HD + 2 * j) = pack_floats<T>(dv[nd][2 * i], dv[nd][2 * i + 1]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// float32 SIMT kernels. TPR = D / 32 threads per row (neighbouring lanes), thread r holds channels r + TPR * i,
// i < 32; CTA = 128 / TPR rows. A RoPE pair (2j, 2j + 1) sits in lanes l and l ^ 1 at the same i.

template <int TPR>
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int off = 1; off < TPR; off <<= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// This thread's 32 channels of row s (zeros when s >= S), turned by RoPE when cos is given. All lanes must call it.
template <int D>
__device__ __forceinline__ void load_row_simt(float (&x)[32], const float* row, int s, int S, const float* cos,
                                              const float* sin) {
  constexpr int TPR = D / 32;
  const int r = threadIdx.x % TPR;
  const bool ok = s < S;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int c = r + TPR * i;
    const float mine = ok ? row[c] : 0.f;
    if (cos != nullptr) {
      const float other = __shfl_xor_sync(kFullMask, mine, 1);
      const float cs = ok ? cos[static_cast<int64_t>(s) * (D / 2) + c / 2] : 0.f;
      const float sn = ok ? sin[static_cast<int64_t>(s) * (D / 2) + c / 2] : 0.f;
      x[i] = (c & 1) ? rot1(other, mine, cs, sn) : rot0(mine, other, cs, sn);
    } else {
      x[i] = mine;
    }
  }
}

// Store this thread's channels of a q or k gradient, turned back through the rotation (g0 cos + g1 sin,
// g1 cos - g0 sin), times factor. All lanes must call it; rows s >= S store nothing.
template <int D>
__device__ __forceinline__ void store_grad_row_simt(float* dst, const float (&gr)[32], float factor, int s, int S,
                                                    const float* cos, const float* sin) {
  constexpr int TPR = D / 32;
  const int r = threadIdx.x % TPR;
  const bool ok = s < S;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int c = r + TPR * i;
    const float mine = gr[i] * factor;
    const float other = __shfl_xor_sync(kFullMask, mine, 1);
    if (ok) {
      const int64_t j = static_cast<int64_t>(s) * (D / 2) + c / 2;
      const float cs = cos[j], sn = sin[j];
      dst[c] = (c & 1) ? mine * cs - other * sn : mine * cs + other * sn;
    }
  }
}

// Rows [s0, s0 + BN) into a shared tile (BN x D floats), RoPE-turned when cos is given; rows >= S are zero.
template <int D, int BN>
__device__ __forceinline__ void load_tile_simt(float* tile, const float* src, int64_t stride, int s0, int S,
                                               const float* cos, const float* sin) {
  constexpr int HALF = D / 2;
  for (int i = threadIdx.x; i < BN * HALF; i += blockDim.x) {
    const int r = i / HALF, p = i % HALF, s = s0 + r;
    float2 v = make_float2(0.f, 0.f);
    if (s < S) {
      v = *reinterpret_cast<const float2*>(src + s * stride + 2 * p);
      if (cos != nullptr) {
        const float c = cos[static_cast<int64_t>(s) * HALF + p], sn = sin[static_cast<int64_t>(s) * HALF + p];
        v = make_float2(rot0(v.x, v.y, c, sn), rot1(v.x, v.y, c, sn));
      }
    }
    *reinterpret_cast<float2*>(tile + r * D + 2 * p) = v;
  }
}

constexpr int kSimtCols = 32;  // keys (forward, dq) or queries (dk/dv) per shared tile

template <int D>
__global__ void __launch_bounds__(kThreads) fwd_simt_kernel(const float* __restrict__ qkv, QkvStrides st,
                                                            const float* __restrict__ cos,
                                                            const float* __restrict__ sin, float* __restrict__ out,
                                                            float* __restrict__ lse, int S, int H, float scale_log2,
                                                            const uint8_t* __restrict__ keep) {
  constexpr int TPR = D / 32, ROWS = kThreads / TPR, BN = kSimtCols;
  extern __shared__ __align__(16) unsigned char smem[];
  float* sK = reinterpret_cast<float*>(smem);
  float* sV = sK + BN * D;
  const int r = threadIdx.x % TPR, b = blockIdx.z, h = blockIdx.y, s = blockIdx.x * ROWS + threadIdx.x / TPR;
  const float* base = qkv + b * st.sB + h * st.sH;
  float q[32], o[32];
  load_row_simt<D>(q, base + static_cast<int64_t>(s < S ? s : 0) * st.sS, s, S, cos, sin);
#pragma unroll
  for (int i = 0; i < 32; ++i) o[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int k0 = 0; k0 < S; k0 += BN) {
    __syncthreads();  // the previous tile is consumed
    load_tile_simt<D, BN>(sK, base + st.s3, st.sS, k0, S, cos, sin);
    load_tile_simt<D, BN>(sV, base + 2 * st.s3, st.sS, k0, S, nullptr, nullptr);
    __syncthreads();
    float sc[BN];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < BN; ++j) {
      float a = 0.f;
#pragma unroll
      for (int i = 0; i < 32; ++i) a += q[i] * sK[j * D + r + TPR * i];
      a = row_sum<TPR>(a);
      sc[j] = k0 + j < S ? (kept(keep, b, S, k0 + j) ? a * scale_log2 : kMaskedLogit) : -INFINITY;
      mx = fmaxf(mx, sc[j]);
    }
    const float m_new = fmaxf(m, mx), corr = exp2f(m - m_new);
    m = m_new;
    l *= corr;
#pragma unroll
    for (int i = 0; i < 32; ++i) o[i] *= corr;
#pragma unroll
    for (int j = 0; j < BN; ++j) {
      const float p = exp2f(sc[j] - m);
      l += p;
#pragma unroll
      for (int i = 0; i < 32; ++i) o[i] += p * sV[j * D + r + TPR * i];
    }
  }
  if (s < S) {
    const float inv = 1.f / l;
    float* dst = out + ((static_cast<int64_t>(b) * S + s) * H + h) * D;
#pragma unroll
    for (int i = 0; i < 32; ++i) dst[r + TPR * i] = o[i] * inv;
    if (r == 0) lse[(static_cast<int64_t>(b) * H + h) * S + s] = (m + log2f(l)) * kLn2;
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) bwd_dq_simt_kernel(const float* __restrict__ qkv, QkvStrides st,
                                                               const float* __restrict__ cos,
                                                               const float* __restrict__ sin,
                                                               const float* __restrict__ gout,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ delta,
                                                               float* __restrict__ grad, int S, int H, float scale,
                                                               float scale_log2, const uint8_t* __restrict__ keep) {
  constexpr int TPR = D / 32, ROWS = kThreads / TPR, BN = kSimtCols;
  extern __shared__ __align__(16) unsigned char smem[];
  float* sK = reinterpret_cast<float*>(smem);
  float* sV = sK + BN * D;
  const int r = threadIdx.x % TPR, b = blockIdx.z, h = blockIdx.y, s = blockIdx.x * ROWS + threadIdx.x / TPR;
  const float* base = qkv + b * st.sB + h * st.sH;
  const int64_t HD = static_cast<int64_t>(H) * D, bh = static_cast<int64_t>(b) * H + h;
  const int sc_ = s < S ? s : 0;  // a valid row to point at; rows >= S load zeros
  float q[32], dO[32], dq[32];
  load_row_simt<D>(q, base + static_cast<int64_t>(sc_) * st.sS, s, S, cos, sin);
  load_row_simt<D>(dO, gout + (static_cast<int64_t>(b) * S + sc_) * HD + h * D, s, S, nullptr, nullptr);
#pragma unroll
  for (int i = 0; i < 32; ++i) dq[i] = 0.f;
  const float lse2 = s < S ? lse[bh * S + s] * kLog2e : 0.f, dl = s < S ? delta[bh * S + s] : 0.f;
  for (int k0 = 0; k0 < S; k0 += BN) {
    __syncthreads();
    load_tile_simt<D, BN>(sK, base + st.s3, st.sS, k0, S, cos, sin);
    load_tile_simt<D, BN>(sV, base + 2 * st.s3, st.sS, k0, S, nullptr, nullptr);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < BN; ++j) {
      float a = 0.f, dp = 0.f;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        a += q[i] * sK[j * D + r + TPR * i];
        dp += dO[i] * sV[j * D + r + TPR * i];
      }
      a = row_sum<TPR>(a);
      dp = row_sum<TPR>(dp);
      const float p = k0 + j < S && kept(keep, b, S, k0 + j) ? exp2f(a * scale_log2 - lse2) : 0.f;
      const float ds = p * (dp - dl);
#pragma unroll
      for (int i = 0; i < 32; ++i) dq[i] += ds * sK[j * D + r + TPR * i];
    }
  }
  store_grad_row_simt<D>(grad + (static_cast<int64_t>(b) * S + sc_) * 3 * HD + h * D, dq, scale, s, S, cos, sin);
}

template <int D>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_simt_kernel(const float* __restrict__ qkv, QkvStrides st,
                                                                 const float* __restrict__ cos,
                                                                 const float* __restrict__ sin,
                                                                 const float* __restrict__ gout,
                                                                 const float* __restrict__ lse,
                                                                 const float* __restrict__ delta,
                                                                 float* __restrict__ grad, int S, int H, float scale,
                                                                 float scale_log2, const uint8_t* __restrict__ keep) {
  constexpr int TPR = D / 32, ROWS = kThreads / TPR, BN = kSimtCols;
  extern __shared__ __align__(16) unsigned char smem[];
  float* sQ = reinterpret_cast<float*>(smem);
  float* sO = sQ + BN * D;
  float* sL = sO + BN * D;
  float* sD = sL + BN;
  const int r = threadIdx.x % TPR, b = blockIdx.z, h = blockIdx.y, s = blockIdx.x * ROWS + threadIdx.x / TPR;
  const float* base = qkv + b * st.sB + h * st.sH;
  const int64_t HD = static_cast<int64_t>(H) * D, bh = static_cast<int64_t>(b) * H + h;
  const float* go = gout + static_cast<int64_t>(b) * S * HD + h * D;
  const int sc_ = s < S ? s : 0;
  float k[32], v[32], dk[32], dv[32];
  load_row_simt<D>(k, base + st.s3 + static_cast<int64_t>(sc_) * st.sS, s, S, cos, sin);
  load_row_simt<D>(v, base + 2 * st.s3 + static_cast<int64_t>(sc_) * st.sS, s, S, nullptr, nullptr);
#pragma unroll
  for (int i = 0; i < 32; ++i) dk[i] = dv[i] = 0.f;
  for (int q0 = 0; q0 < S; q0 += BN) {
    __syncthreads();
    load_tile_simt<D, BN>(sQ, base, st.sS, q0, S, cos, sin);
    load_tile_simt<D, BN>(sO, go, HD, q0, S, nullptr, nullptr);
    for (int i = threadIdx.x; i < BN; i += blockDim.x) {
      sL[i] = q0 + i < S ? lse[bh * S + q0 + i] * kLog2e : 0.f;
      sD[i] = q0 + i < S ? delta[bh * S + q0 + i] : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < BN; ++j) {
      float a = 0.f, dp = 0.f;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        a += k[i] * sQ[j * D + r + TPR * i];
        dp += v[i] * sO[j * D + r + TPR * i];
      }
      a = row_sum<TPR>(a);
      dp = row_sum<TPR>(dp);
      const float p = q0 + j < S && kept(keep, b, S, s) ? exp2f(a * scale_log2 - sL[j]) : 0.f;   // s: this key
      const float ds = p * (dp - sD[j]);
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        dv[i] += p * sO[j * D + r + TPR * i];
        dk[i] += ds * sQ[j * D + r + TPR * i];
      }
    }
  }
  float* dst = grad + (static_cast<int64_t>(b) * S + sc_) * 3 * HD + h * D;
  store_grad_row_simt<D>(dst + HD, dk, scale, s, S, cos, sin);
  if (s < S) {
#pragma unroll
    for (int i = 0; i < 32; ++i) dst[2 * HD + r + TPR * i] = dv[i];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

// Launch with dynamic shared memory, raising the kernel's limit above the 48 KiB default when needed.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, size_t smem, Args... args) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernels read 16-byte vectors: the last dim contiguous, the other strides and the start aligned to 16 bytes.
bool vector_ok(const at::Tensor& t) {
  const int64_t per16 = 16 / static_cast<int64_t>(t.element_size());
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.stride(i) % per16 == 0 || t.size(i) == 1);
  return ok;
}
at::Tensor vector_ready(const at::Tensor& t) {
  if (vector_ok(t)) return t;
  const at::Tensor c = t.contiguous();
  return vector_ok(c) ? c : c.clone();  // a contiguous view may still start unaligned
}

QkvStrides qkv_strides(const at::Tensor& qkv) { return {qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3)}; }

// f.template operator()<T, D>() with T in {float, __half, __nv_bfloat16} and D in {64, 128} (checked before).
template <int D, typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f.template operator()<float, D>(); break;
    case at::kHalf: f.template operator()<__half, D>(); break;
    case at::kBFloat16: f.template operator()<__nv_bfloat16, D>(); break;
    default: BIGR_CHECK(false, "rope_attention: no CUDA kernel for ", dtype);
  }
}
template <typename F>
void dispatch(at::ScalarType dtype, int64_t D, F&& f) {
  if (D == 64) dispatch_dtype<64>(dtype, f);
  else dispatch_dtype<128>(dtype, f);
}

void check_cuda_support(const char* op, const AttnDims& d, at::ScalarType dtype) {
  BIGR_CHECK(d.D == 64 || d.D == 128, op, ": the CUDA kernels are built for head dims 64 and 128, got d=", d.D);
  BIGR_CHECK(d.B <= 65535 && d.H <= 65535, op, ": B and H must be at most 65535 on CUDA, got B=", d.B, ", H=", d.H);
  BIGR_CHECK(d.S < (int64_t{1} << 31) / 3, op, ": S=", d.S, " is too long");
  if (dtype != at::kFloat) {
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    BIGR_CHECK(prop->major >= 8, op, ": the ", dtype, " kernels use sm80 tensor-core instructions; this GPU is sm",
               prop->major, prop->minor, " (use float32 there)");
  }
}

template <typename T, int D>
void forward_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const AttnDims& d,
                  const uint8_t* keep, at::Tensor& out, at::Tensor& lse) {
  const int S = static_cast<int>(d.S), H = static_cast<int>(d.H);
  const float scale_log2 = static_cast<float>(kLog2e / std::sqrt(static_cast<double>(D)));
  const auto* x = reinterpret_cast<const T*>(qkv.data_ptr());
  auto* o = reinterpret_cast<T*>(out.data_ptr());
  if constexpr (std::is_same_v<T, float>) {
    constexpr int rows = kThreads / (D / 32);
    const dim3 grid((S + rows - 1) / rows, H, d.B);
    launch(fwd_simt_kernel<D>, grid, 2 * kSimtCols * D * sizeof(float), x, qkv_strides(qkv), cos.data_ptr<float>(),
           sin.data_ptr<float>(), o, lse.data_ptr<float>(), S, H, scale_log2, keep);
  } else {
    const dim3 grid((S + kRows - 1) / kRows, H, d.B);
    launch(fwd_tc_kernel<T, D>, grid, 2 * 64 * (D + 8) * sizeof(T), x, qkv_strides(qkv), cos.data_ptr<float>(),
           sin.data_ptr<float>(), o, lse.data_ptr<float>(), S, H, scale_log2, keep);
  }
}

template <typename T, int D>
void backward_cuda(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& lse, const at::Tensor& delta, const AttnDims& d, const uint8_t* keep,
                   at::Tensor& grad) {
  const int S = static_cast<int>(d.S), H = static_cast<int>(d.H);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const float scale_log2 = scale * kLog2e;
  const auto* x = reinterpret_cast<const T*>(qkv.data_ptr());
  const auto* go = reinterpret_cast<const T*>(grad_out.data_ptr());
  auto* gr = reinterpret_cast<T*>(grad.data_ptr());
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const float* ls = lse.data_ptr<float>();
  const float* dl = delta.data_ptr<float>();
  if constexpr (std::is_same_v<T, float>) {
    constexpr int rows = kThreads / (D / 32);
    const dim3 grid((S + rows - 1) / rows, H, d.B);
    launch(bwd_dq_simt_kernel<D>, grid, 2 * kSimtCols * D * sizeof(float), x, qkv_strides(qkv), cs, sn, go, ls, dl,
           gr, S, H, scale, scale_log2, keep);
    launch(bwd_dkdv_simt_kernel<D>, grid, (2 * kSimtCols * D + 2 * kSimtCols) * sizeof(float), x, qkv_strides(qkv),
           cs, sn, go, ls, dl, gr, S, H, scale, scale_log2, keep);
  } else {
    const dim3 grid((S + kRows - 1) / kRows, H, d.B);
    launch(bwd_dq_tc_kernel<T, D>, grid, 4 * 64 * (D + 8) * sizeof(T), x, qkv_strides(qkv), cs, sn, go, ls, dl, gr, S,
           H, scale, scale_log2, keep);
    constexpr int BN = D == 128 ? 32 : 64;  // keeps dk, dv and two score tiles in registers
    launch(bwd_dkdv_tc_kernel<T, D, BN>, grid, (2 * 64 + 2 * BN) * (D + 8) * sizeof(T) + 2 * BN * sizeof(float), x,
           qkv_strides(qkv), cs, sn, go, ls, dl, gr, S, H, scale, scale_log2, keep);
  }
}

// The key mask's bytes (B, S) on the device, or null. Rows that mask every key are not detected here (that needs a
// host sync): such a row averages all values.
const uint8_t* key_mask_bytes(const char* op, const std::optional<at::Tensor>& key_mask, const AttnDims& d,
                              const at::Tensor& qkv, at::Tensor& hold) {
  if (!key_mask.has_value()) return nullptr;
  check_key_mask(op, *key_mask, d, qkv);
  hold = key_mask->contiguous();
  return reinterpret_cast<const uint8_t*>(hold.data_ptr());
}

std::tuple<at::Tensor, at::Tensor> rope_attention_cuda(const at::Tensor& qkv_in, const at::Tensor& cos_in,
                                                       const at::Tensor& sin_in,
                                                       const std::optional<at::Tensor>& key_mask) {
  const AttnDims d = check_rope_attention_inputs("rope_attention", qkv_in, cos_in, sin_in);
  at::Tensor keep_hold;
  const uint8_t* keep = key_mask_bytes("rope_attention", key_mask, d, qkv_in, keep_hold);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  check_cuda_support("rope_attention", d, qkv_in.scalar_type());
  const at::Tensor qkv = vector_ready(qkv_in), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty({d.B, d.S, d.H * d.D}, qkv.options());
  at::Tensor lse = at::empty({d.B, d.H, d.S}, qkv.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  dispatch(qkv.scalar_type(), d.D, [&]<typename T, int D>() { forward_cuda<T, D>(qkv, cos, sin, d, keep, out, lse); });
  return {out, lse};
}

at::Tensor rope_attention_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                                        const at::Tensor& cos_in, const at::Tensor& sin_in, const at::Tensor& out,
                                        const at::Tensor& lse_in, const std::optional<at::Tensor>& key_mask) {
  const AttnDims d = check_rope_attention_inputs("rope_attention_backward", qkv_in, cos_in, sin_in);
  check_rope_attention_backward_inputs("rope_attention_backward", d, qkv_in, grad_out_in, out, lse_in);
  at::Tensor keep_hold;
  const uint8_t* keep = key_mask_bytes("rope_attention_backward", key_mask, d, qkv_in, keep_hold);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  check_cuda_support("rope_attention_backward", d, qkv_in.scalar_type());
  const at::Tensor qkv = vector_ready(qkv_in), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const at::Tensor grad_out = vector_ready(grad_out_in.contiguous()), lse = lse_in.contiguous();
  at::Tensor grad = at::empty({d.B, d.S, 3, d.H, d.D}, qkv.options());
  if (grad.numel() == 0) return grad;
  // delta = rowsum(dO * O) per (b, h, query), float32.
  const at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat))
                               .reshape({d.B, d.S, d.H, d.D})
                               .sum(-1)
                               .transpose(1, 2)
                               .contiguous();
  dispatch(qkv.scalar_type(), d.D, [&]<typename T, int D>() {
    backward_cuda<T, D>(grad_out, qkv, cos, sin, lse, delta, d, keep, grad);
  });
  return grad;
}

// ---------------------------------------------------------------------------------------------------------------
// rope_attention_cached: A active rows per batch row against a K/V cache (B, H, S, d), any even head dim up to 256,
// float32 math for every dtype (SIMT; the active sets are small, so this is simple rather than tensor-core fast).
//
// Two launches on the current stream: cached_write_kernel puts the active rows' rotated keys and values into the
// caches, then cached_attn_kernel lets every active query attend over all S cached keys. The attention of one
// (batch, head) needs the keys of all A active rows of that batch row, written by other CTAs; stream order between
// the launches gives that without a grid-wide barrier. The alternative, one CTA per (batch, head) that writes its
// rows, syncs and then attends, would cap the parallelism at B*H CTAs, and the write costs little (A*H*d elements).
// No host sync, nothing allocated beyond `out`: CUDA-graph safe. Positions are not range-checked on the device (that
// needs a sync); a position outside [0, S) writes nothing and gives that row NaN instead of touching other memory.

constexpr int kCachedRowsPerWarp = 2;
constexpr int kCachedRows = (kThreads / 32) * kCachedRowsPerWarp;  // active rows per CTA
constexpr int kCachedKeys = 32;                                    // keys per shared tile: one per lane
constexpr int kCachedMaxHeadDim = 256;

__device__ __forceinline__ float cvt_in(float x) { return x; }
__device__ __forceinline__ float cvt_in(__half x) { return __half2float(x); }
__device__ __forceinline__ float cvt_in(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T cvt_out(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else return Elem<T>::from_float(x);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// One thread per (batch, active row, head, channel pair), grid-stride: k turned by RoPE at the row's position
// (float32 math, rounded to T as transformer.apply_rope does), v copied.
template <typename T>
__global__ void __launch_bounds__(kThreads) cached_write_kernel(const T* __restrict__ qkv, QkvStrides st,
                                                                const int64_t* __restrict__ index,
                                                                T* __restrict__ k_cache, T* __restrict__ v_cache,
                                                                const float* __restrict__ cos,
                                                                const float* __restrict__ sin, int64_t n, int A,
                                                                int S, int H, int D) {
  const int half = D / 2;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int p = static_cast<int>(i % half);
    int64_t r = i / half;
    const int h = static_cast<int>(r % H);
    r /= H;
    const int a = static_cast<int>(r % A);
    const int64_t b = r / A;
    const int64_t pos = index[b * A + a];
    if (pos < 0 || pos >= S) continue;
    const T* src = qkv + b * st.sB + a * st.sS + h * st.sH + 2 * p;
    const float x0 = cvt_in(src[st.s3]), x1 = cvt_in(src[st.s3 + 1]);
    const float c = cos[pos * half + p], sn = sin[pos * half + p];
    const int64_t dst = ((b * H + h) * S + pos) * D + 2 * p;
    k_cache[dst] = cvt_out<T>(rot0(x0, x1, c, sn));
    k_cache[dst + 1] = cvt_out<T>(rot1(x0, x1, c, sn));
    v_cache[dst] = src[2 * st.s3];
    v_cache[dst + 1] = src[2 * st.s3 + 1];
  }
}

// Grid: B * H * ceil(A / kCachedRows) CTAs of 4 warps, CTA (b, h, tile) owning active rows tile*8 .. tile*8+7 of
// batch row b, warp w rows 2w and 2w+1. Shared, float32: the CTA's rotated queries (8 x d), then per step a tile of 32
// cached keys (row stride d + 1, odd, so that lane j reading key j is conflict-free) and values (rows padded to
// 32 * NC channels with zeros). Scores: lane j computes key j's logit; online softmax in the log2 domain across the
// warp; P V: lane l accumulates channels l + 32 i (i < NC) with key j's probability broadcast by a shuffle.
template <typename T, int NC>
__global__ void __launch_bounds__(kThreads) cached_attn_kernel(const T* __restrict__ qkv, QkvStrides st,
                                                               const int64_t* __restrict__ index,
                                                               const T* __restrict__ k_cache,
                                                               const T* __restrict__ v_cache,
                                                               const float* __restrict__ cos,
                                                               const float* __restrict__ sin, T* __restrict__ out,
                                                               int A, int S, int H, int D, int tiles,
                                                               float scale_log2, const uint8_t* __restrict__ keep) {
  constexpr int DP = 32 * NC, BN = kCachedKeys;
  extern __shared__ __align__(16) unsigned char smem[];
  const int LK = D + 1, half = D / 2;
  float* sQ = reinterpret_cast<float*>(smem);
  float* sK = sQ + kCachedRows * D;
  float* sV = sK + BN * LK;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int64_t bh = blockIdx.x / tiles, b = bh / H;
  const int h = static_cast<int>(bh % H), a0 = tile * kCachedRows;

  for (int i = threadIdx.x; i < kCachedRows * half; i += blockDim.x) {
    const int r = i / half, p = i % half, a = a0 + r;
    float q0 = 0.f, q1 = 0.f;
    if (a < A) {
      const int64_t pos = index[b * A + a];
      if (pos >= 0 && pos < S) {
        const T* src = qkv + b * st.sB + static_cast<int64_t>(a) * st.sS + h * st.sH + 2 * p;
        const float x0 = cvt_in(src[0]), x1 = cvt_in(src[1]);
        const float c = cos[pos * half + p], sn = sin[pos * half + p];
        q0 = cvt_in(cvt_out<T>(rot0(x0, x1, c, sn)));
        q1 = cvt_in(cvt_out<T>(rot1(x0, x1, c, sn)));
      } else {
        q0 = q1 = NAN;
      }
    }
    sQ[r * D + 2 * p] = q0;
    sQ[r * D + 2 * p + 1] = q1;
  }

  const T* kh = k_cache + bh * S * D;
  const T* vh = v_cache + bh * S * D;
  float o[kCachedRowsPerWarp][NC];
  float m[kCachedRowsPerWarp], l[kCachedRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kCachedRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int i = 0; i < NC; ++i) o[rr][i] = 0.f;
  }
  for (int k0 = 0; k0 < S; k0 += BN) {
    __syncthreads();  // the queries are in place; the previous tile is consumed
    for (int i = threadIdx.x; i < BN * DP; i += blockDim.x) {
      const int j = i / DP, c = i % DP, s = k0 + j;
      const bool ok = s < S && c < D;
      const int64_t off = static_cast<int64_t>(ok ? s : 0) * D + (ok ? c : 0);
      if (c < D) sK[j * LK + c] = ok ? cvt_in(kh[off]) : 0.f;
      sV[j * DP + c] = ok ? cvt_in(vh[off]) : 0.f;
    }
    __syncthreads();
    const int nk = min(BN, S - k0);  // valid keys in this tile (>= 1)
    const float* kr = sK + lane * LK;
#pragma unroll
    for (int rr = 0; rr < kCachedRowsPerWarp; ++rr) {
      const float* qr = sQ + (warp * kCachedRowsPerWarp + rr) * D;
      float a = 0.f;
#pragma unroll 8
      for (int c = 0; c < D; ++c) a += qr[c] * kr[c];
      // a masked key (keep: the key mask's bytes) gets the finite kMaskedLogit, as in rope_attention's kernels
      const float sc = lane < nk ? (kept(keep, static_cast<int>(b), S, k0 + lane) ? a * scale_log2 : kMaskedLogit)
                                 : -INFINITY;
      const float m_new = fmaxf(m[rr], warp_max(sc));  // finite: lane 0's key is valid (kept or kMaskedLogit)
      const float corr = exp2f(m[rr] - m_new);         // 0 on the first tile
      const float pr = exp2f(sc - m_new);              // 0 for the tile's missing keys
      l[rr] = l[rr] * corr + warp_sum(pr);
      m[rr] = m_new;
#pragma unroll
      for (int i = 0; i < NC; ++i) o[rr][i] *= corr;
      for (int j = 0; j < nk; ++j) {
        const float pj = __shfl_sync(kFullMask, pr, j);
#pragma unroll
        for (int i = 0; i < NC; ++i) o[rr][i] += pj * sV[j * DP + lane + 32 * i];
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kCachedRowsPerWarp; ++rr) {
    const int a = a0 + warp * kCachedRowsPerWarp + rr;
    if (a < A) {
      const float inv = 1.f / l[rr];
      T* dst = out + ((b * A + a) * H + h) * D;
#pragma unroll
      for (int i = 0; i < NC; ++i) {
        const int c = lane + 32 * i;
        if (c < D) dst[c] = cvt_out<T>(o[rr][i] * inv);
      }
    }
  }
}

template <typename T, int NC>
void cached_cuda(const at::Tensor& qkv, const at::Tensor& index, at::Tensor& k_cache, at::Tensor& v_cache,
                 const at::Tensor& cos, const at::Tensor& sin, const CachedAttnDims& d, const uint8_t* keep,
                 at::Tensor& out) {
  const int A = static_cast<int>(d.A), S = static_cast<int>(d.S), H = static_cast<int>(d.H);
  const int D = static_cast<int>(d.D);
  const auto* x = reinterpret_cast<const T*>(qkv.data_ptr());
  const int64_t* ix = index.data_ptr<int64_t>();
  auto* kc = reinterpret_cast<T*>(k_cache.data_ptr());
  auto* vc = reinterpret_cast<T*>(v_cache.data_ptr());
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const int64_t n = d.B * d.A * d.H * (d.D / 2);
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 16);
  launch(cached_write_kernel<T>, dim3(static_cast<unsigned>(blocks)), 0, x, qkv_strides(qkv), ix, kc, vc, cs, sn, n,
         A, S, H, D);
  const int tiles = (A + kCachedRows - 1) / kCachedRows;
  const size_t smem = (kCachedRows * D + kCachedKeys * (D + 1) + kCachedKeys * 32 * NC) * sizeof(float);
  const float scale_log2 = static_cast<float>(kLog2e / std::sqrt(static_cast<double>(D)));
  launch(cached_attn_kernel<T, NC>, dim3(static_cast<unsigned>(d.B * d.H * tiles)), smem, x, qkv_strides(qkv), ix,
         static_cast<const T*>(kc), static_cast<const T*>(vc), cs, sn, reinterpret_cast<T*>(out.data_ptr()), A, S,
         H, D, tiles, scale_log2, keep);
}

at::Tensor rope_attention_cached_cuda(const at::Tensor& qkv_in, const at::Tensor& index_in, at::Tensor& k_cache,
                                      at::Tensor& v_cache, const at::Tensor& cos_in, const at::Tensor& sin_in,
                                      const std::optional<at::Tensor>& key_mask) {
  const char* op = "rope_attention_cached";
  const CachedAttnDims d = check_rope_attention_cached_inputs(op, qkv_in, index_in, k_cache, v_cache, cos_in, sin_in);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  at::Tensor keep_hold;   // over the S cached positions
  const uint8_t* keep = key_mask_bytes(op, key_mask, AttnDims{d.B, d.S, d.H, d.D}, qkv_in, keep_hold);
  BIGR_CHECK(d.D <= kCachedMaxHeadDim, op, ": the CUDA kernel takes even head dims up to ", kCachedMaxHeadDim,
             ", got d=", d.D);
  BIGR_CHECK(d.S < (int64_t{1} << 31) && d.H < (int64_t{1} << 31), op, ": S=", d.S, " or H=", d.H, " is too large");
  const int64_t tiles = (d.A + kCachedRows - 1) / kCachedRows;
  BIGR_CHECK(d.B * d.H * tiles < (int64_t{1} << 31), op, ": B*H*ceil(A/", kCachedRows, ") = ", d.B * d.H * tiles,
             " CTAs is more than one launch takes");
  const at::Tensor qkv = qkv_in.stride(-1) == 1 ? qkv_in : qkv_in.contiguous();
  const at::Tensor index = index_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty({d.B, d.A, d.H * d.D}, qkv.options());
  if (out.numel() == 0) return out;
  const auto run = [&]<typename T>() {
    if (d.D <= 32) cached_cuda<T, 1>(qkv, index, k_cache, v_cache, cos, sin, d, keep, out);
    else if (d.D <= 64) cached_cuda<T, 2>(qkv, index, k_cache, v_cache, cos, sin, d, keep, out);
    else if (d.D <= 128) cached_cuda<T, 4>(qkv, index, k_cache, v_cache, cos, sin, d, keep, out);
    else cached_cuda<T, 8>(qkv, index, k_cache, v_cache, cos, sin, d, keep, out);
  };
  switch (qkv.scalar_type()) {
    case at::kFloat: run.template operator()<float>(); break;
    case at::kHalf: run.template operator()<__half>(); break;
    case at::kBFloat16: run.template operator()<__nv_bfloat16>(); break;
    default: BIGR_CHECK(false, op, ": no CUDA kernel for ", qkv.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace bigr

TORCH_LIBRARY_IMPL(bigr, CUDA, m) {
  m.impl("rope_attention", &bigr::rope_attention_cuda);
  m.impl("rope_attention_backward", &bigr::rope_attention_backward_cuda);
  m.impl("rope_attention_cached", &bigr::rope_attention_cached_cuda);
}
