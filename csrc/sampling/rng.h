// The counter-based RNG of bigr_engine/ops/rng.py, for CPU and CUDA kernels: bit-identical to the Python version.
//
// A draw is keyed by (seed, sample index, stream, counter): a chain of 32-bit "lowbias32" mixers,
//   h = mix32(seed_lo); h = absorb(h, seed_hi); h = absorb(h, sample); h = absorb(h, stream); h = absorb(h, counter)
// with absorb(h, v) = mix32(h ^ mix32(v + 0x9E3779B9 mod 2^32)); every key is taken mod 2^32.
// Uniforms are ((bits >> 8) + 0.5) * 2^-24 in float32 arithmetic; Gumbel noise is -log(-log u) in double, rounded.
#pragma once
#include <cstdint>
#include <cmath>

#ifndef BIGR_HD
#if defined(__CUDACC__)
#define BIGR_HD __host__ __device__ __forceinline__
#else
#define BIGR_HD inline
#endif
#endif

namespace bigr::rng {

BIGR_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

BIGR_HD uint32_t absorb(uint32_t h, uint32_t v) { return mix32(h ^ mix32(v + 0x9E3779B9u)); }

BIGR_HD uint32_t low32(int64_t v) { return static_cast<uint32_t>(static_cast<uint64_t>(v)); }

// The part of the chain that depends on the seed only (compute it once, on the host).
BIGR_HD uint32_t seed_key(int64_t seed) {
  return absorb(mix32(low32(seed)), static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32));
}

// Row b's seed key: its own seed's when per-row seeds are given (a service batching requests of different seeds),
// else the call's.
BIGR_HD uint32_t row_seed_key(uint32_t seed_k, const int64_t* seeds, int64_t b) {
  return seeds ? seed_key(seeds[b]) : seed_k;
}

// The key of one sample's stream: seed_key, then the sample index, then the stream id.
BIGR_HD uint32_t stream_key(uint32_t seed_k, int64_t sample_index, int64_t stream) {
  return absorb(absorb(seed_k, low32(sample_index)), low32(stream));
}

// The 32 random bits at one counter of a stream (rng.random_bits_at).
BIGR_HD uint32_t bits_at(uint32_t stream_k, int64_t counter) { return absorb(stream_k, low32(counter)); }

// rng.to_uniform: float32 in (0, 1]; the sum rounds as float32 addition does (to nearest even).
BIGR_HD float to_uniform(uint32_t bits) {
  const float top = static_cast<float>(bits >> 8);  // exact: below 2^24
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__fadd_rn(top, 0.5f), 5.9604644775390625e-08f);
#else
  return (top + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
#endif
}

// rng.to_gumbel: -log(-log u) in double, rounded to float32 (the libm log may differ from torch's in the last
// double ulp; after rounding to float32 that almost never shows).
BIGR_HD float to_gumbel(float u) { return static_cast<float>(-log(-log(static_cast<double>(u)))); }

}  // namespace bigr::rng
