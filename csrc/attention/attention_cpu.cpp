// CPU kernels: rope_attention forward and backward (bidirectional softmax attention with 2D RoPE on q and k), and
// rope_attention_cached (the forward for a subset of rows against a K/V cache; see cached_impl).
//
// Flash-style. Each task owns a block of rows of one (batch, head): queries in the forward and the dq pass, keys in the
// dk/dv pass, and walks the other side in column blocks with an online softmax (forward) or with the saved
// log-sum-exp (backward), so no S x S matrix exists beyond one block per task. Tasks run in parallel over
// (batch, head, row block) with at::parallel_for; a thread first prepares the head's operands in its own scratch:
// q and k rotated (float32 math, rounded to the input dtype as transformer.apply_rope does) and everything converted
// to the math type, as rows and transposed, padded to multiples of 16. The backward's dq tasks and dk/dv tasks both
// recompute the probabilities: no two tasks write the same row, so no atomics or reductions.
//
// Math is float32 for float32, bfloat16 and float16 inputs; float64 inputs run in float64 throughout (for gradcheck).
// The float32 block kernels use GCC vector extensions (16 lanes) and are compiled for AVX-512, AVX2 and baseline
// x86-64, picked when the library loads (target_clones); exp is a polynomial (below) so that it vectorises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors never cross a call boundary: every helper is inlined

#include "bigr/clones.h"

namespace bigr {
namespace {

constexpr int VL = 16;  // float32 lanes per vector; buffers are padded to multiples of VL
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

BIGR_INLINE vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
BIGR_INLINE void vstore(float* p, const vf& v) { std::memcpy(p, &v, sizeof v); }
BIGR_INLINE vf vsplat(float x) { return vf{} + x; }
BIGR_INLINE vf vselect(const vi& mask, const vf& a, const vf& b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
BIGR_INLINE vf vmax(const vf& a, const vf& b) { return vselect(a > b, a, b); }
BIGR_INLINE vf vmin(const vf& a, const vf& b) { return vselect(a < b, a, b); }

// e^x, x clamped to [-87, 88]: 2^n * e^r with n = round(x / ln2) and |r| <= ln2 / 2, e^r by its Taylor polynomial to
// r^7 (truncation < 1e-8 relative); within 2 ulp of expf. exp(-87) = 1.6e-38 stands in for smaller values, which
// only ever add to sums that are >= 1.
BIGR_INLINE vf vexp(const vf& xin) {
  const vf x = vmin(vmax(xin, vsplat(-87.f)), vsplat(88.f));
  const vf magic = vsplat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;
  const vi ni = (vi)t - 0x4B400000;
  vf r = x - n * 0.693359375f;  // ln2 in two parts: 0.693359375 has 9 significant bits, so n * it is exact
  r = r + n * 2.12194440e-4f;
  vf p = vsplat(1.f / 5040);
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi e = (ni + 127) << 23;
  return p * (vf)e;
}

BIGR_INLINE float hmax(const vf& v) {
  float m = v[0];
  for (int i = 1; i < VL; ++i) m = std::max(m, v[i]);
  return m;
}
BIGR_INLINE float hsum(const vf& v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Block primitives. Each is a template over the math type T (float or double); the float versions run on vectors
// and require the column counts passed as `ncp` / `C` to be multiples of VL.

// c[r*ldc + j] = alpha * sum_k a[r*lda + k] * bt[k*ldb + j] for r < R, j < J, k < K.
template <int RR>
BIGR_INLINE void score_rows_f32(const float* a, int64_t lda, const float* bt, int64_t ldb, float* c, int64_t ldc,
                                int J, int K, float alpha) {
  int j = 0;
  for (; j + 2 * VL <= J; j += 2 * VL) {
    vf acc[RR][2];
#pragma GCC unroll 8
    for (int rr = 0; rr < RR; ++rr) acc[rr][0] = acc[rr][1] = vf{};
    for (int k = 0; k < K; ++k) {
      const vf b0 = vload(bt + k * ldb + j), b1 = vload(bt + k * ldb + j + VL);
#pragma GCC unroll 8
      for (int rr = 0; rr < RR; ++rr) {
        const float av = a[rr * lda + k];
        acc[rr][0] += av * b0;
        acc[rr][1] += av * b1;
      }
    }
#pragma GCC unroll 8
    for (int rr = 0; rr < RR; ++rr) {
      vstore(c + rr * ldc + j, acc[rr][0] * alpha);
      vstore(c + rr * ldc + j + VL, acc[rr][1] * alpha);
    }
  }
  if (j < J) {  // one vector of columns left
    vf acc[RR];
#pragma GCC unroll 8
    for (int rr = 0; rr < RR; ++rr) acc[rr] = vf{};
    for (int k = 0; k < K; ++k) {
      const vf b0 = vload(bt + k * ldb + j);
#pragma GCC unroll 8
      for (int rr = 0; rr < RR; ++rr) acc[rr] += a[rr * lda + k] * b0;
    }
#pragma GCC unroll 8
    for (int rr = 0; rr < RR; ++rr) vstore(c + rr * ldc + j, acc[rr] * alpha);
  }
}

template <typename T>
BIGR_INLINE void score_impl(const T* a, int64_t lda, const T* bt, int64_t ldb, T* c, int64_t ldc, int R, int J, int K,
                            T alpha) {
  if constexpr (std::is_same_v<T, float>) {
    int r = 0;
    for (; r + 4 <= R; r += 4) score_rows_f32<4>(a + r * lda, lda, bt, ldb, c + r * ldc, ldc, J, K, alpha);
    const float* ar = a + r * lda;
    float* cr = c + r * ldc;
    switch (R - r) {
      case 3: score_rows_f32<3>(ar, lda, bt, ldb, cr, ldc, J, K, alpha); break;
      case 2: score_rows_f32<2>(ar, lda, bt, ldb, cr, ldc, J, K, alpha); break;
      case 1: score_rows_f32<1>(ar, lda, bt, ldb, cr, ldc, J, K, alpha); break;
      default: break;
    }
  } else {
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < J; ++j) c[r * ldc + j] = 0;
      for (int k = 0; k < K; ++k) {
        const T av = a[r * lda + k];
        for (int j = 0; j < J; ++j) c[r * ldc + j] += av * bt[k * ldb + j];
      }
      for (int j = 0; j < J; ++j) c[r * ldc + j] *= alpha;
    }
  }
}

// o[r*ldo + c] = corr[r] * o[r*ldo + c] + sum_{t < T} a[r*lda + t] * b[t*ldb + c] for r < R, c < C (corr null: 1).
template <int RR, int NV>
BIGR_INLINE void acc_rows_f32(float* o, int64_t ldo, const float* corr, const float* a, int64_t lda, const float* b,
                              int64_t ldb, int T, int c0) {
  vf acc[RR][NV];
#pragma GCC unroll 8
  for (int rr = 0; rr < RR; ++rr) {
    const float f = corr ? corr[rr] : 1.f;
#pragma GCC unroll 8
    for (int nv = 0; nv < NV; ++nv) acc[rr][nv] = vload(o + rr * ldo + c0 + nv * VL) * f;
  }
  for (int t = 0; t < T; ++t) {
    vf bv[NV];
#pragma GCC unroll 8
    for (int nv = 0; nv < NV; ++nv) bv[nv] = vload(b + t * ldb + c0 + nv * VL);
#pragma GCC unroll 8
    for (int rr = 0; rr < RR; ++rr) {
      const float av = a[rr * lda + t];
#pragma GCC unroll 8
      for (int nv = 0; nv < NV; ++nv) acc[rr][nv] += av * bv[nv];
    }
  }
#pragma GCC unroll 8
  for (int rr = 0; rr < RR; ++rr)
#pragma GCC unroll 8
    for (int nv = 0; nv < NV; ++nv) vstore(o + rr * ldo + c0 + nv * VL, acc[rr][nv]);
}

template <int RR>
BIGR_INLINE void acc_rows_all_f32(float* o, int64_t ldo, const float* corr, const float* a, int64_t lda,
                                  const float* b, int64_t ldb, int T, int C) {
  int c0 = 0;
  for (; c0 + 4 * VL <= C; c0 += 4 * VL) acc_rows_f32<RR, 4>(o, ldo, corr, a, lda, b, ldb, T, c0);
  switch ((C - c0) / VL) {
    case 3: acc_rows_f32<RR, 3>(o, ldo, corr, a, lda, b, ldb, T, c0); break;
    case 2: acc_rows_f32<RR, 2>(o, ldo, corr, a, lda, b, ldb, T, c0); break;
    case 1: acc_rows_f32<RR, 1>(o, ldo, corr, a, lda, b, ldb, T, c0); break;
    default: break;
  }
}

template <typename T>
BIGR_INLINE void acc_impl(T* o, int64_t ldo, const T* corr, const T* a, int64_t lda, const T* b, int64_t ldb, int R,
                          int Tn, int C) {
  if constexpr (std::is_same_v<T, float>) {
    int r = 0;
    for (; r + 4 <= R; r += 4)
      acc_rows_all_f32<4>(o + r * ldo, ldo, corr ? corr + r : nullptr, a + r * lda, lda, b, ldb, Tn, C);
    float* orow = o + r * ldo;
    const float* crow = corr ? corr + r : nullptr;
    const float* arow = a + r * lda;
    switch (R - r) {
      case 3: acc_rows_all_f32<3>(orow, ldo, crow, arow, lda, b, ldb, Tn, C); break;
      case 2: acc_rows_all_f32<2>(orow, ldo, crow, arow, lda, b, ldb, Tn, C); break;
      case 1: acc_rows_all_f32<1>(orow, ldo, crow, arow, lda, b, ldb, Tn, C); break;
      default: break;
    }
  } else {
    for (int r = 0; r < R; ++r) {
      T* orow = o + r * ldo;
      if (corr)
        for (int c = 0; c < C; ++c) orow[c] *= corr[r];
      for (int t = 0; t < Tn; ++t) {
        const T av = a[r * lda + t];
        for (int c = 0; c < C; ++c) orow[c] += av * b[t * ldb + c];
      }
    }
  }
}

// One online-softmax step over a block of scores s (R rows of ncp columns, the first nc valid): m and l (running max
// and sum) are updated, s becomes exp(s - m_new) with the padded columns zeroed, corr[r] = exp(m_old - m_new).
template <typename T>
BIGR_INLINE void softmax_step_impl(T* s, int64_t lds, int R, int nc, int ncp, T* m, T* l, T* corr) {
  for (int r = 0; r < R; ++r) {
    T* row = s + r * lds;
    T mx = -std::numeric_limits<T>::infinity();
    int j = 0;
    if constexpr (std::is_same_v<T, float>) {
      if (nc >= VL) {
        vf vm = vload(row);
        for (j = VL; j + VL <= nc; j += VL) vm = vmax(vm, vload(row + j));
        mx = hmax(vm);
      }
    }
    for (; j < nc; ++j) mx = std::max(mx, row[j]);
    const T m_new = std::max(m[r], mx);
    corr[r] = std::exp(m[r] - m_new);  // 0 on the first block (m = -inf)
    T sum = 0;
    if constexpr (std::is_same_v<T, float>) {
      const vf vm = vsplat(m_new);
      for (j = 0; j < ncp; j += VL) vstore(row + j, vexp(vload(row + j) - vm));
      for (j = nc; j < ncp; ++j) row[j] = 0.f;
      vf vs = vf{};
      for (j = 0; j < ncp; j += VL) vs += vload(row + j);
      sum = hsum(vs);
    } else {
      for (j = 0; j < nc; ++j) sum += (row[j] = std::exp(row[j] - m_new));
      for (; j < ncp; ++j) row[j] = 0;
    }
    l[r] = l[r] * corr[r] + sum;
    m[r] = m_new;
  }
}

// The backward's probabilities and score gradients. p = exp(s - lse), ds = p * (dp - delta); "rows": lse and delta
// per row (the dq pass, rows are queries), "cols": per column (the dk/dv pass, columns are queries).
template <typename T, bool PER_COL>
BIGR_INLINE void exp_lse_impl(T* s, int64_t lds, int R, int ncp, const T* lse) {
  for (int r = 0; r < R; ++r) {
    T* row = s + r * lds;
    if constexpr (std::is_same_v<T, float>) {
      for (int j = 0; j < ncp; j += VL)
        vstore(row + j, vexp(vload(row + j) - (PER_COL ? vload(lse + j) : vsplat(lse[r]))));
    } else {
      for (int j = 0; j < ncp; ++j) row[j] = std::exp(row[j] - (PER_COL ? lse[j] : lse[r]));
    }
  }
}

template <typename T, bool PER_COL>
BIGR_INLINE void dscore_impl(T* p, const T* dp, int64_t ld, int R, int ncp, const T* delta) {
  for (int r = 0; r < R; ++r) {
    T* row = p + r * ld;
    const T* drow = dp + r * ld;
    if constexpr (std::is_same_v<T, float>) {
      for (int j = 0; j < ncp; j += VL)
        vstore(row + j, vload(row + j) * (vload(drow + j) - (PER_COL ? vload(delta + j) : vsplat(delta[r]))));
    } else {
      for (int j = 0; j < ncp; ++j) row[j] *= drow[j] - (PER_COL ? delta[j] : delta[r]);
    }
  }
}

// The float32 primitives, compiled per instruction set; float64 calls the templates directly.
BIGR_CPU_CLONES void score_f32(const float* a, int64_t lda, const float* bt, int64_t ldb, float* c, int64_t ldc, int R,
                               int J, int K, float alpha) {
  score_impl<float>(a, lda, bt, ldb, c, ldc, R, J, K, alpha);
}
BIGR_CPU_CLONES void acc_f32(float* o, int64_t ldo, const float* corr, const float* a, int64_t lda, const float* b,
                             int64_t ldb, int R, int Tn, int C) {
  acc_impl<float>(o, ldo, corr, a, lda, b, ldb, R, Tn, C);
}
BIGR_CPU_CLONES void softmax_step_f32(float* s, int64_t lds, int R, int nc, int ncp, float* m, float* l, float* corr) {
  softmax_step_impl<float>(s, lds, R, nc, ncp, m, l, corr);
}
BIGR_CPU_CLONES void exp_lse_rows_f32(float* s, int64_t lds, int R, int ncp, const float* lse) {
  exp_lse_impl<float, false>(s, lds, R, ncp, lse);
}
BIGR_CPU_CLONES void exp_lse_cols_f32(float* s, int64_t lds, int R, int ncp, const float* lse) {
  exp_lse_impl<float, true>(s, lds, R, ncp, lse);
}
BIGR_CPU_CLONES void dscore_rows_f32(float* p, const float* dp, int64_t ld, int R, int ncp, const float* delta) {
  dscore_impl<float, false>(p, dp, ld, R, ncp, delta);
}
BIGR_CPU_CLONES void dscore_cols_f32(float* p, const float* dp, int64_t ld, int R, int ncp, const float* delta) {
  dscore_impl<float, true>(p, dp, ld, R, ncp, delta);
}

template <typename T>
struct Prim {
  static void score(const T* a, int64_t lda, const T* bt, int64_t ldb, T* c, int64_t ldc, int R, int J, int K,
                    T alpha) {
    score_impl<T>(a, lda, bt, ldb, c, ldc, R, J, K, alpha);
  }
  static void acc(T* o, int64_t ldo, const T* corr, const T* a, int64_t lda, const T* b, int64_t ldb, int R, int Tn,
                  int C) {
    acc_impl<T>(o, ldo, corr, a, lda, b, ldb, R, Tn, C);
  }
  static void softmax_step(T* s, int64_t lds, int R, int nc, int ncp, T* m, T* l, T* corr) {
    softmax_step_impl<T>(s, lds, R, nc, ncp, m, l, corr);
  }
  template <bool PER_COL>
  static void exp_lse(T* s, int64_t lds, int R, int ncp, const T* lse) {
    exp_lse_impl<T, PER_COL>(s, lds, R, ncp, lse);
  }
  template <bool PER_COL>
  static void dscore(T* p, const T* dp, int64_t ld, int R, int ncp, const T* delta) {
    dscore_impl<T, PER_COL>(p, dp, ld, R, ncp, delta);
  }
};

template <>
struct Prim<float> {
  static void score(const float* a, int64_t lda, const float* bt, int64_t ldb, float* c, int64_t ldc, int R, int J,
                    int K, float alpha) {
    score_f32(a, lda, bt, ldb, c, ldc, R, J, K, alpha);
  }
  static void acc(float* o, int64_t ldo, const float* corr, const float* a, int64_t lda, const float* b, int64_t ldb,
                  int R, int Tn, int C) {
    acc_f32(o, ldo, corr, a, lda, b, ldb, R, Tn, C);
  }
  static void softmax_step(float* s, int64_t lds, int R, int nc, int ncp, float* m, float* l, float* corr) {
    softmax_step_f32(s, lds, R, nc, ncp, m, l, corr);
  }
  template <bool PER_COL>
  static void exp_lse(float* s, int64_t lds, int R, int ncp, const float* lse) {
    if constexpr (PER_COL) exp_lse_cols_f32(s, lds, R, ncp, lse);
    else exp_lse_rows_f32(s, lds, R, ncp, lse);
  }
  template <bool PER_COL>
  static void dscore(float* p, const float* dp, int64_t ld, int R, int ncp, const float* delta) {
    if constexpr (PER_COL) dscore_cols_f32(p, dp, ld, R, ncp, delta);
    else dscore_rows_f32(p, dp, ld, R, ncp, delta);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// RoPE. Float32 math (float64 for float64 inputs) on pairs (2j, 2j+1): out0 = x0 cos - x1 sin, out1 = x1 cos + x0 sin,
// rounded to the input dtype like transformer.apply_rope. Its backward turns the gradient back: g0 cos + g1 sin,
// g1 cos - g0 sin.
template <typename scalar_t>
using rope_math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t, typename T>
void rope_row(const scalar_t* x, const float* cs, const float* sn, int64_t half, T* dst) {
  using R = rope_math_t<scalar_t>;
  for (int64_t j = 0; j < half; ++j) {
    const R x0 = static_cast<R>(x[2 * j]), x1 = static_cast<R>(x[2 * j + 1]);
    const R c = cs[j], s = sn[j];
    dst[2 * j] = static_cast<T>(static_cast<scalar_t>(x0 * c - x1 * s));
    dst[2 * j + 1] = static_cast<T>(static_cast<scalar_t>(x1 * c + x0 * s));
  }
}

template <typename scalar_t, typename T>
void rope_backward_row(const T* g, const float* cs, const float* sn, int64_t half, T factor, scalar_t* dst) {
  for (int64_t j = 0; j < half; ++j) {
    const T g0 = g[2 * j] * factor, g1 = g[2 * j + 1] * factor;
    const T c = cs[j], s = sn[j];
    dst[2 * j] = static_cast<scalar_t>(g0 * c + g1 * s);
    dst[2 * j + 1] = static_cast<scalar_t>(g1 * c - g0 * s);
  }
}

// Grain sizes for at::parallel_for: chunks of at least ~2^20 flops, so that small problems stay on one thread instead
// of paying a fork-join (which costs milliseconds when the machine is oversubscribed).
constexpr int64_t kMinTaskFlops = int64_t{1} << 20;
int64_t grain_for(int64_t flops_per_task, int64_t min_flops) {
  return std::max<int64_t>(1, (min_flops + flops_per_task - 1) / std::max<int64_t>(1, flops_per_task));
}

// Blocking: rows per task (<= 64, balanced over the sequence) and columns per inner block (<= 256, multiple of VL).
struct Blocking {
  int64_t rows, nrb, cols;
  explicit Blocking(int64_t S) : Blocking(S, S) {}
  // n_rows query rows against n_cols keys (rope_attention_cached: A active rows, S cached keys).
  Blocking(int64_t n_rows, int64_t n_cols) {
    nrb = (n_rows + 63) / 64;
    rows = nrb > 0 ? (n_rows + nrb - 1) / nrb : 0;
    const int64_t ncb = (n_cols + 255) / 256;
    cols = ncb > 0 ? round_up((n_cols + ncb - 1) / ncb, VL) : VL;
  }
};

// qkv element (b, s, which, h, 0) with arbitrary strides; the last dimension is contiguous.
template <typename scalar_t>
struct QkvView {
  const scalar_t* p;
  int64_t sB, sS, s3, sH;
  const scalar_t* row(int64_t b, int64_t s, int64_t which, int64_t h) const {
    return p + b * sB + s * sS + which * s3 + h * sH;
  }
};

template <typename scalar_t>
QkvView<scalar_t> qkv_view(const at::Tensor& qkv) {
  return {qkv.data_ptr<scalar_t>(), qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3)};
}

// ---------------------------------------------------------------------------------------------------------------
// Per-thread scratch, reused across calls (at::parallel_for's threads persist): no large allocation per call, hence
// no page faults. It holds one (batch, head)'s prepared operands, so it grows with S * d.
template <typename T>
T* thread_workspace(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// One (batch, head)'s rotated k, transposed (kt: D rows of Sp, padding columns zero), and v as rows (S x Dp).
template <typename scalar_t, typename T>
void prepare_kv(const QkvView<scalar_t>& x, const float* cs, const float* sn, int64_t b, int64_t h, int64_t S,
                int64_t D, int64_t Dp, int64_t Sp, T* kt, T* v, T* tmp) {
  const int64_t half = D / 2;
  for (int64_t s = 0; s < S; ++s) {
    rope_row(x.row(b, s, 1, h), cs + s * half, sn + s * half, half, tmp);
    for (int64_t c = 0; c < D; ++c) kt[c * Sp + s] = tmp[c];
    const scalar_t* vs = x.row(b, s, 2, h);
    for (int64_t c = 0; c < D; ++c) v[s * Dp + c] = static_cast<T>(vs[c]);
    for (int64_t c = D; c < Dp; ++c) v[s * Dp + c] = T(0);
  }
  for (int64_t c = 0; c < D; ++c)
    for (int64_t s = S; s < Sp; ++s) kt[c * Sp + s] = T(0);
}

// One block of nr query rows (q: rotated, rows of Dp) attends over S keys (kt, v as prepare_kv lays them out) with the
// online softmax, C keys at a time: -> o (R rows of Dp, not yet divided by l), m (running max) and l (running sum).
// A masked key's score: finite, so that a block whose keys are all masked leaves the running max finite (no
// exp(-inf - -inf)), and so low that its weight underflows (to the polynomial exp's floor, 1.6e-38 of a kept key's)
// once any kept key is seen; every row has one (checked).
template <typename T>
constexpr T kMaskedScore = T(-1e30);

// Scores of masked keys: columns c0 + j with keep[c0 + j] == 0 (keep null: none masked), in R rows of ld.
template <typename T>
void mask_columns(T* s, int64_t ld, int64_t nr, const uint8_t* keep, int64_t c0, int nc) {
  if (keep == nullptr) return;
  for (int j = 0; j < nc; ++j)
    if (!keep[c0 + j])
      for (int64_t r = 0; r < nr; ++r) s[r * ld + j] = kMaskedScore<T>;
}

// keep (S,) of this batch row, null for none masked.
template <typename T>
void attend_block(const T* q, const T* kt, const T* v, int64_t nr, int64_t S, int64_t Sp, int64_t D, int64_t Dp,
                  int64_t R, int64_t C, T scale, T* s, T* o, T* m, T* l, T* corr, const uint8_t* keep = nullptr) {
  std::fill(o, o + R * Dp, T(0));
  std::fill(m, m + R, -std::numeric_limits<T>::infinity());
  std::fill(l, l + R, T(0));
  for (int64_t c0 = 0; c0 < S; c0 += C) {
    const int nc = static_cast<int>(std::min(C, S - c0)), ncp = static_cast<int>(round_up(nc, VL));
    Prim<T>::score(q, Dp, kt + c0, Sp, s, C, nr, ncp, D, scale);
    mask_columns(s, C, nr, keep, c0, nc);
    Prim<T>::softmax_step(s, C, nr, nc, ncp, m, l, corr);
    Prim<T>::acc(o, Dp, corr, s, C, v + c0 * Dp, Dp, nr, nc, Dp);
  }
}

template <typename scalar_t, typename T>
void forward_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const AttnDims& d,
                  const uint8_t* keep, at::Tensor& out, at::Tensor& lse) {
  const int64_t S = d.S, H = d.H, D = d.D, half = D / 2, BH = d.B * H;
  const int64_t Dp = round_up(D, VL), Sp = round_up(S, VL);
  const QkvView<scalar_t> x = qkv_view<scalar_t>(qkv);
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  scalar_t* o_out = out.data_ptr<scalar_t>();
  T* lse_out = lse.data_ptr<T>();
  const Blocking blk(S);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(D)));
  const int64_t R = blk.rows, C = blk.cols;
  const int64_t ws = D * Sp + S * Dp + 2 * R * Dp + R * C + 3 * R;
  // Tasks are (batch*head, row block), head-major: a thread's contiguous range of tasks prepares k and v once per head.
  at::parallel_for(0, BH * blk.nrb, grain_for(4 * R * S * D, kMinTaskFlops), [&](int64_t lo, int64_t hi) {
    T* kt = thread_workspace<T>(ws);
    T* v = kt + D * Sp;
    T* q = v + S * Dp;
    T* o = q + R * Dp;
    T* s = o + R * Dp;
    T* m = s + R * C;
    T* l = m + R;
    T* corr = l + R;
    int64_t ready = -1;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t bh = task / blk.nrb, b = bh / H, h = bh % H;
      const int64_t r0 = (task % blk.nrb) * R, nr = std::min(R, S - r0);
      if (bh != ready) {
        prepare_kv(x, cs, sn, b, h, S, D, Dp, Sp, kt, v, o);
        ready = bh;
      }
      for (int64_t r = 0; r < nr; ++r)
        rope_row(x.row(b, r0 + r, 0, h), cs + (r0 + r) * half, sn + (r0 + r) * half, half, q + r * Dp);
      attend_block(q, kt, v, nr, S, Sp, D, Dp, R, C, scale, s, o, m, l, corr, keep ? keep + b * S : nullptr);
      for (int64_t r = 0; r < nr; ++r) {
        const T inv = T(1) / l[r];
        scalar_t* dst = o_out + ((b * S + r0 + r) * H + h) * D;
        for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<scalar_t>(o[r * Dp + c] * inv);
        lse_out[bh * S + r0 + r] = m[r] + std::log(l[r]);
      }
    }
  });
}

template <typename scalar_t, typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& out, const at::Tensor& lse, const AttnDims& d, const uint8_t* keep_all,
                   at::Tensor& grad) {
  const int64_t S = d.S, H = d.H, D = d.D, half = D / 2, BH = d.B * H;
  const int64_t Dp = round_up(D, VL), Sp = round_up(S, VL);
  const QkvView<scalar_t> x = qkv_view<scalar_t>(qkv);
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  const scalar_t* ov = out.data_ptr<scalar_t>();
  const T* lse_in = lse.data_ptr<T>();
  scalar_t* g = grad.data_ptr<scalar_t>();  // (B, S, 3, H, D) contiguous
  const Blocking blk(S);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(D)));
  const int64_t R = blk.rows, C = blk.cols;
  const int64_t ws = 4 * S * Dp + 4 * D * Sp + 2 * Sp + 2 * R * Dp + 2 * R * C;
  // Even tasks own query rows and make dq, odd tasks own key rows and make dk and dv; interleaved and head-major, so
  // that a thread's contiguous range gets both kinds and prepares each head once.
  const int64_t n = BH * blk.nrb;
  at::parallel_for(0, 2 * n, grain_for(7 * R * S * D, kMinTaskFlops), [&](int64_t lo, int64_t hi) {
    // One head's rotated q and k, v and grad_out as rows (S x Dp) and transposed (D x Sp), its lse and
    // delta = rowsum(grad_out * out) per query (Sp), then the task's accumulators and score blocks.
    T* Q = thread_workspace<T>(ws);
    T *K = Q + S * Dp, *V = K + S * Dp, *dO = V + S * Dp;
    T *Qt = dO + S * Dp, *Kt = Qt + D * Sp, *Vt = Kt + D * Sp, *dOt = Vt + D * Sp;
    T *lse_p = dOt + D * Sp, *delta = lse_p + Sp;
    T *acc1 = delta + Sp, *acc2 = acc1 + R * Dp, *s = acc2 + R * Dp, *dp = s + R * C;
    int64_t ready = -1;
    for (int64_t task = lo; task < hi; ++task) {
      const bool dq_pass = task % 2 == 0;
      const int64_t t = task / 2, bh = t / blk.nrb, b = bh / H, h = bh % H;
      const int64_t r0 = (t % blk.nrb) * R, nr = std::min(R, S - r0);
      const uint8_t* keep = keep_all ? keep_all + b * S : nullptr;
      if (bh != ready) {
        for (int64_t i = 0; i < S; ++i) {
          rope_row(x.row(b, i, 0, h), cs + i * half, sn + i * half, half, Q + i * Dp);
          rope_row(x.row(b, i, 1, h), cs + i * half, sn + i * half, half, K + i * Dp);
          const scalar_t* vs = x.row(b, i, 2, h);
          const int64_t oo = ((b * S + i) * H + h) * D;
          T dsum = 0;
          for (int64_t c = 0; c < D; ++c) {
            V[i * Dp + c] = static_cast<T>(vs[c]);
            dO[i * Dp + c] = static_cast<T>(go[oo + c]);
            dsum += dO[i * Dp + c] * static_cast<T>(ov[oo + c]);
          }
          for (int64_t c = D; c < Dp; ++c) Q[i * Dp + c] = K[i * Dp + c] = V[i * Dp + c] = dO[i * Dp + c] = T(0);
          for (int64_t c = 0; c < D; ++c) {
            Qt[c * Sp + i] = Q[i * Dp + c];
            Kt[c * Sp + i] = K[i * Dp + c];
            Vt[c * Sp + i] = V[i * Dp + c];
            dOt[c * Sp + i] = dO[i * Dp + c];
          }
          lse_p[i] = lse_in[bh * S + i];
          delta[i] = dsum;
        }
        for (int64_t i = S; i < Sp; ++i) {
          for (int64_t c = 0; c < D; ++c) Qt[c * Sp + i] = Kt[c * Sp + i] = Vt[c * Sp + i] = dOt[c * Sp + i] = T(0);
          lse_p[i] = delta[i] = T(0);
        }
        ready = bh;
      }
      std::fill(acc1, acc1 + R * Dp, T(0));
      std::fill(acc2, acc2 + R * Dp, T(0));
      for (int64_t c0 = 0; c0 < S; c0 += C) {
        const int nc = static_cast<int>(std::min(C, S - c0)), ncp = static_cast<int>(round_up(nc, VL));
        if (dq_pass) {  // p = exp(q k^T * scale - lse), dp = dO v^T, ds = p (dp - delta), dq' += ds k
          Prim<T>::score(Q + r0 * Dp, Dp, Kt + c0, Sp, s, C, nr, ncp, D, scale);
          mask_columns(s, C, nr, keep, c0, nc);   // masked keys: p = 0
          Prim<T>::template exp_lse<false>(s, C, nr, ncp, lse_p + r0);
          Prim<T>::score(dO + r0 * Dp, Dp, Vt + c0, Sp, dp, C, nr, ncp, D, T(1));
          Prim<T>::template dscore<false>(s, dp, C, nr, ncp, delta + r0);
          Prim<T>::acc(acc1, Dp, nullptr, s, C, K + c0 * Dp, Dp, nr, nc, Dp);
        } else {  // transposed: p^T = exp(k q^T * scale - lse), dv += p^T dO, dp^T = v dO^T, dk' += ds^T q
          Prim<T>::score(K + r0 * Dp, Dp, Qt + c0, Sp, s, C, nr, ncp, D, scale);
          if (keep)   // this task's rows are keys: a masked one gets p = 0 from every query, so dk = dv = 0
            for (int64_t r = 0; r < nr; ++r)
              if (!keep[r0 + r]) std::fill(s + r * C, s + r * C + nc, kMaskedScore<T>);
          Prim<T>::template exp_lse<true>(s, C, nr, ncp, lse_p + c0);
          Prim<T>::acc(acc2, Dp, nullptr, s, C, dO + c0 * Dp, Dp, nr, nc, Dp);
          Prim<T>::score(V + r0 * Dp, Dp, dOt + c0, Sp, dp, C, nr, ncp, D, T(1));
          Prim<T>::template dscore<true>(s, dp, C, nr, ncp, delta + c0);
          Prim<T>::acc(acc1, Dp, nullptr, s, C, Q + c0 * Dp, Dp, nr, nc, Dp);
        }
      }
      const int64_t HD = H * D;
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t si = r0 + r;
        scalar_t* dst = g + (b * S + si) * 3 * HD + h * D;
        if (dq_pass) {
          rope_backward_row(acc1 + r * Dp, cs + si * half, sn + si * half, half, scale, dst);
        } else {
          rope_backward_row(acc1 + r * Dp, cs + si * half, sn + si * half, half, scale, dst + HD);
          for (int64_t c = 0; c < D; ++c) dst[2 * HD + c] = static_cast<scalar_t>(acc2[r * Dp + c]);
        }
      }
    }
  });
}

// rope_attention_cached, in two passes. (1) The active rows' k, rotated at their positions (rounded to the input
// dtype as in rope_attention), and their v are written into the caches; parallel over (batch, active row), no two
// rows write the same place as positions are distinct within a batch row. (2) After that pass has finished (the
// parallel_for returns only when every chunk has), the forward's flash loop runs for the active queries against all
// S cached keys of their (batch, head): tasks are (batch*head, block of active rows), head-major, and a thread
// prepares a head's keys (transposed) and values from the caches once per contiguous range of tasks.
template <typename scalar_t, typename T>
void cached_impl(const at::Tensor& qkv, const int64_t* pos, at::Tensor& k_cache, at::Tensor& v_cache,
                 const at::Tensor& cos, const at::Tensor& sin, const CachedAttnDims& d, const uint8_t* keep,
                 at::Tensor& out) {
  const int64_t A = d.A, S = d.S, H = d.H, D = d.D, half = D / 2, BH = d.B * H;
  const int64_t Dp = round_up(D, VL), Sp = round_up(S, VL);
  const QkvView<scalar_t> x = qkv_view<scalar_t>(qkv);
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  scalar_t* kc = k_cache.data_ptr<scalar_t>();
  scalar_t* vc = v_cache.data_ptr<scalar_t>();
  scalar_t* o_out = out.data_ptr<scalar_t>();

  // (1) the cache writes
  at::parallel_for(0, d.B * A, grain_for(8 * H * D, kMinTaskFlops), [&](int64_t lo, int64_t hi) {
    for (int64_t ba = lo; ba < hi; ++ba) {
      const int64_t b = ba / A, a = ba % A, p = pos[ba];
      for (int64_t h = 0; h < H; ++h) {
        const int64_t off = ((b * H + h) * S + p) * D;
        rope_row(x.row(b, a, 1, h), cs + p * half, sn + p * half, half, kc + off);
        std::copy_n(x.row(b, a, 2, h), D, vc + off);
      }
    }
  });

  // (2) the attention of the active queries over the caches
  const Blocking blk(A, S);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(D)));
  const int64_t R = blk.rows, C = blk.cols;
  const int64_t ws = D * Sp + S * Dp + 2 * R * Dp + R * C + 3 * R;
  at::parallel_for(0, BH * blk.nrb, grain_for(4 * R * S * D, kMinTaskFlops), [&](int64_t lo, int64_t hi) {
    T* kt = thread_workspace<T>(ws);
    T* v = kt + D * Sp;
    T* q = v + S * Dp;
    T* o = q + R * Dp;
    T* s = o + R * Dp;
    T* m = s + R * C;
    T* l = m + R;
    T* corr = l + R;
    int64_t ready = -1;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t bh = task / blk.nrb, b = bh / H, h = bh % H;
      const int64_t r0 = (task % blk.nrb) * R, nr = std::min(R, A - r0);
      if (bh != ready) {  // this head's cached keys transposed (kt: D rows of Sp) and values as rows (S x Dp)
        const scalar_t* kh = kc + bh * S * D;
        const scalar_t* vh = vc + bh * S * D;
        for (int64_t j = 0; j < S; ++j) {
          for (int64_t c = 0; c < D; ++c) kt[c * Sp + j] = static_cast<T>(kh[j * D + c]);
          for (int64_t c = 0; c < D; ++c) v[j * Dp + c] = static_cast<T>(vh[j * D + c]);
          for (int64_t c = D; c < Dp; ++c) v[j * Dp + c] = T(0);
        }
        for (int64_t c = 0; c < D; ++c)
          for (int64_t j = S; j < Sp; ++j) kt[c * Sp + j] = T(0);
        ready = bh;
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t p = pos[b * A + r0 + r];
        T* qr = q + r * Dp;
        rope_row(x.row(b, r0 + r, 0, h), cs + p * half, sn + p * half, half, qr);
        std::fill(qr + D, qr + Dp, T(0));
      }
      attend_block(q, kt, v, nr, S, Sp, D, Dp, R, C, scale, s, o, m, l, corr, keep ? keep + b * S : nullptr);
      for (int64_t r = 0; r < nr; ++r) {
        const T inv = T(1) / l[r];
        scalar_t* dst = o_out + ((b * A + r0 + r) * H + h) * D;
        for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<scalar_t>(o[r * Dp + c] * inv);
      }
    }
  });
}

template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The key mask as bytes (B, S), or null; every row keeps at least one key (an all-masked row has no softmax).
const uint8_t* key_mask_bytes(const char* op, const std::optional<at::Tensor>& key_mask, const AttnDims& d,
                              const at::Tensor& qkv, at::Tensor& hold) {
  if (!key_mask.has_value()) return nullptr;
  check_key_mask(op, *key_mask, d, qkv);
  hold = key_mask->to(at::kByte).contiguous();
  if (d.B * d.S > 0)
    BIGR_CHECK(hold.amax(1).min().item<uint8_t>() != 0, op, ": key_mask masks every key of a row; keep at least "
               "one (the image tokens) per row");
  return hold.data_ptr<uint8_t>();
}

std::tuple<at::Tensor, at::Tensor> rope_attention_cpu(const at::Tensor& qkv_in, const at::Tensor& cos_in,
                                                      const at::Tensor& sin_in,
                                                      const std::optional<at::Tensor>& key_mask) {
  const AttnDims d = check_rope_attention_inputs("rope_attention", qkv_in, cos_in, sin_in);
  at::Tensor keep_hold;
  const uint8_t* keep = key_mask_bytes("rope_attention", key_mask, d, qkv_in, keep_hold);
  const at::Tensor qkv = last_dim_contiguous(qkv_in), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty({d.B, d.S, d.H * d.D}, qkv.options());
  at::Tensor lse = at::empty({d.B, d.H, d.S}, qkv.options().dtype(attention_lse_dtype(qkv.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_attention_cpu", [&] {
    forward_impl<scalar_t, math_t<scalar_t>>(qkv, cos, sin, d, keep, out, lse);
  });
  return {out, lse};
}

at::Tensor rope_attention_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                                       const at::Tensor& cos_in, const at::Tensor& sin_in, const at::Tensor& out_in,
                                       const at::Tensor& lse_in, const std::optional<at::Tensor>& key_mask) {
  const AttnDims d = check_rope_attention_inputs("rope_attention_backward", qkv_in, cos_in, sin_in);
  check_rope_attention_backward_inputs("rope_attention_backward", d, qkv_in, grad_out_in, out_in, lse_in);
  at::Tensor keep_hold;
  const uint8_t* keep = key_mask_bytes("rope_attention_backward", key_mask, d, qkv_in, keep_hold);
  const at::Tensor qkv = last_dim_contiguous(qkv_in), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor grad = at::empty({d.B, d.S, 3, d.H, d.D}, qkv.options());
  if (grad.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_attention_backward_cpu", [&] {
    backward_impl<scalar_t, math_t<scalar_t>>(grad_out, qkv, cos, sin, out, lse, d, keep, grad);
  });
  return grad;
}

at::Tensor rope_attention_cached_cpu(const at::Tensor& qkv_in, const at::Tensor& index_in, at::Tensor& k_cache,
                                     at::Tensor& v_cache, const at::Tensor& cos_in, const at::Tensor& sin_in,
                                     const std::optional<at::Tensor>& key_mask) {
  const char* op = "rope_attention_cached";
  const CachedAttnDims d = check_rope_attention_cached_inputs(op, qkv_in, index_in, k_cache, v_cache, cos_in, sin_in);
  at::Tensor keep_hold;   // over the S cached positions
  const uint8_t* keep = key_mask_bytes(op, key_mask, AttnDims{d.B, d.S, d.H, d.D}, qkv_in, keep_hold);
  const at::Tensor qkv = last_dim_contiguous(qkv_in), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  at::Tensor out = at::empty({d.B, d.A, d.H * d.D}, qkv.options());
  if (out.numel() == 0) return out;
  // Positions in range and distinct within each batch row, before anything is written (a duplicate would make two
  // rows write one cache slot, and the result depend on their order).
  const int64_t* pos = index.data_ptr<int64_t>();
  std::vector<uint8_t> seen(d.S);
  for (int64_t b = 0; b < d.B; ++b) {
    std::fill(seen.begin(), seen.end(), uint8_t{0});
    for (int64_t a = 0; a < d.A; ++a) {
      const int64_t p = pos[b * d.A + a];
      BIGR_CHECK(p >= 0 && p < d.S, op, ": index[", b, ", ", a, "] = ", p, " is outside the cache's positions 0..",
                 d.S - 1);
      BIGR_CHECK(!seen[p], op, ": index[", b, "] holds position ", p, " twice (positions must be distinct per row)");
      seen[p] = 1;
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_attention_cached_cpu", [&] {
    cached_impl<scalar_t, math_t<scalar_t>>(qkv, pos, k_cache, v_cache, cos, sin, d, keep, out);
  });
  return out;
}

}  // namespace
}  // namespace bigr

TORCH_LIBRARY_IMPL(bigr, CPU, m) {
  m.impl("rope_attention", &bigr::rope_attention_cpu);
  m.impl("rope_attention_backward", &bigr::rope_attention_backward_cpu);
  m.impl("rope_attention_cached", &bigr::rope_attention_cached_cpu);
}
