// Arithmetic shared by the CPU and CUDA sampling kernels (posterior_step, unmask_topk).
//
// Bit-identical results on both backends need every float operation rounded once, in the same order:
// on the device the _rn intrinsics (never fused into FMAs); on the host plain operators, with the source
// compiled with -ffp-contract=off (CMakeLists.txt). No libm call is used except log in the Gumbel noise.
// bigr_engine/ops/reference.py performs the same operations with torch ops.
#pragma once
#include <cstdint>
#include <cstring>

#include "rng.h"

namespace bigr::fp {

#if defined(__CUDA_ARCH__)
BIGR_HD float add(float a, float b) { return __fadd_rn(a, b); }
BIGR_HD float sub(float a, float b) { return __fsub_rn(a, b); }
BIGR_HD float mul(float a, float b) { return __fmul_rn(a, b); }
BIGR_HD float div(float a, float b) { return __fdiv_rn(a, b); }
BIGR_HD double add(double a, double b) { return __dadd_rn(a, b); }
BIGR_HD double sub(double a, double b) { return __dsub_rn(a, b); }
BIGR_HD double mul(double a, double b) { return __dmul_rn(a, b); }
BIGR_HD double div(double a, double b) { return __ddiv_rn(a, b); }
BIGR_HD double round_even(double a) { return rint(a); }
BIGR_HD double bits_to_double(int64_t b) { return __longlong_as_double(b); }
BIGR_HD uint32_t float_bits(float f) { return __float_as_uint(f); }
#else
BIGR_HD float add(float a, float b) { return a + b; }
BIGR_HD float sub(float a, float b) { return a - b; }
BIGR_HD float mul(float a, float b) { return a * b; }
BIGR_HD float div(float a, float b) { return a / b; }
BIGR_HD double add(double a, double b) { return a + b; }
BIGR_HD double sub(double a, double b) { return a - b; }
BIGR_HD double mul(double a, double b) { return a * b; }
BIGR_HD double div(double a, double b) { return a / b; }
BIGR_HD double round_even(double a) { return std::nearbyint(a); }  // default rounding mode: half to even
BIGR_HD double bits_to_double(int64_t b) { double d; std::memcpy(&d, &b, sizeof d); return d; }
BIGR_HD uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, sizeof u); return u; }
#endif

}  // namespace bigr::fp

namespace bigr::sampling {

// sigmoid(l) = 1 / (1 + exp(-l)) in double, rounded to float32. exp(x) = 2^k * P(r) with k = round(x / ln 2),
// r = x - k ln2_hi - k ln2_lo (|r| <= 0.35) and P the degree-13 Taylor polynomial (relative error < 1e-16).
// x is clamped to [-40, 110] first, which changes no result: below -40, 1 + e^x is 1 in double; above 110,
// the sigmoid is below half the smallest float32 subnormal. NaN stays NaN.
BIGR_HD float sigmoid(float l) {
  if (l != l) return l;
  double x = -static_cast<double>(l);
  x = x < -40.0 ? -40.0 : (x > 110.0 ? 110.0 : x);
  const double k = fp::round_even(fp::mul(x, 1.4426950408889634));
  const double r = fp::sub(fp::sub(x, fp::mul(k, 6.93147180369123816490e-01)), fp::mul(k, 1.90821492927058770002e-10));
  constexpr double c[14] = {1.0, 1.0, 0.5, 0.16666666666666666, 0.041666666666666664, 0.008333333333333333,
                            0.001388888888888889, 0.0001984126984126984, 2.48015873015873e-05,
                            2.7557319223985893e-06, 2.755731922398589e-07, 2.505210838544172e-08,
                            2.08767569878681e-09, 1.6059043836821613e-10};
  double p = c[13];
  for (int i = 12; i >= 0; --i) p = fp::add(fp::mul(p, r), c[i]);
  const double scale = fp::bits_to_double((static_cast<int64_t>(k) + 1023) << 52);  // 2^k, exact
  const double e = fp::mul(p, scale);
  return static_cast<float>(fp::div(1.0, fp::add(1.0, e)));
}

// Flip logits -> P(x_0 = 1) as transcoder.flip_to_p0 with x_t in {0, 1}: x_t (1 - p) + (1 - x_t) p selects
// 1 - p or p exactly.
BIGR_HD float flip_to_p0(float p_flip, bool x) { return x ? fp::sub(1.0f, p_flip) : p_flip; }

// The CFG-combined, temperature-scaled logit, as engine.transcode_masked computes it:
// l_c / temp and l_u / temp first, then l_u + cfg * (l_c - l_u).
BIGR_HD float guided_logit(float lc, float lu, bool has_u, float cfg, float temperature) {
  const float c = fp::div(lc, temperature);
  if (!has_u) return c;
  const float u = fp::div(lu, temperature);
  return fp::add(u, fp::mul(cfg, fp::sub(c, u)));
}

// The likelihood of x_t = 1 at t given x_(t') = v, composed one step at a time over beta_t, ..., beta_(t'+1)
// (transcoder.posterior_one): v <- beta_s v + 0.5 (1 - beta_s).
BIGR_HD float compose_likelihood(float v, const float* beta, int64_t t, int64_t t_next) {
  for (int64_t s = t; s > t_next; --s) v = fp::add(fp::mul(beta[s], v), fp::mul(0.5f, fp::sub(1.0f, beta[s])));
  return v;
}

// P(x_(t') = 1 | x_t, p0) (transcoder.posterior_one); like_one / like_zero: the composed likelihood starting
// from 1 and from 0 (compose_likelihood(1, ...), compose_likelihood(0, ...)).
BIGR_HD float posterior(float p0, bool x, float k_next, float b_next, float like_one, float like_zero) {
  const float prior1 = fp::add(fp::mul(k_next, p0), b_next);
  const float prior0 = fp::sub(1.0f, prior1);
  const float post1 = fp::mul(prior1, x ? like_one : like_zero);
  const float post0 = fp::mul(prior0, x ? like_zero : like_one);
  return fp::div(post1, fp::add(post1, post0));
}

// Mean over K bits of 2 |p0 - 0.5| (sampler.confidence), summed in bit order.
BIGR_HD float confidence(const float* p0, int64_t K) {
  float s = 0.0f;
  for (int64_t j = 0; j < K; ++j) s = fp::add(s, fp::mul(2.0f, fabsf(fp::sub(p0[j], 0.5f))));
  return fp::div(s, static_cast<float>(K));
}

// A key whose ascending order is torch.sort(descending=True, stable=True)'s order: larger values first, NaN before
// everything, -0 equal to +0, ties to the lower candidate index i (< 2^31). Bit 31 of the low word flags a
// candidate that may not be chosen (it already has conf -inf, so the flag never reorders anything).
BIGR_HD uint64_t order_key(float conf, uint32_t i, bool blocked) {
  uint32_t d;
  if (conf != conf) {
    d = 0u;
  } else {
    uint32_t f = conf == 0.0f ? 0u : fp::float_bits(conf);
    const uint32_t ascending = (f & 0x80000000u) ? ~f : (f | 0x80000000u);
    d = ~ascending;
  }
  return (static_cast<uint64_t>(d) << 32) | i | (blocked ? 0x80000000u : 0u);
}

BIGR_HD uint32_t key_index(uint64_t key) { return static_cast<uint32_t>(key) & 0x7FFFFFFFu; }
BIGR_HD bool key_blocked(uint64_t key) { return (static_cast<uint32_t>(key) & 0x80000000u) != 0u; }

}  // namespace bigr::sampling
