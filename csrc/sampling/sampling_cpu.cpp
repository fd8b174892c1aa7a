// CPU kernels of the generation loop: rng_bits / rng_uniform (the rng.py hash), posterior_step, unmask_topk.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "sampling.h"
#include "sampling_checks.h"

namespace bigr {

template <typename out_t, typename F>
static at::Tensor rng_cpu(const char* op, int64_t seed, const at::Tensor& sample_index, int64_t stream,
                          const at::Tensor& counters, const std::optional<at::Tensor>& seeds, at::ScalarType dtype,
                          F&& finish) {
  check_rng_args(op, sample_index, counters);
  at::Tensor seeds_hold;
  const int64_t* rs = row_seeds(op, seeds, sample_index, seeds_hold);
  const at::Tensor s = sample_index.to(at::kLong).contiguous();
  const at::Tensor c = counters.to(at::kLong).contiguous();
  at::Tensor out = at::empty(counters.sizes(), counters.options().dtype(dtype));
  const int64_t total = c.numel();
  if (total == 0) return out;
  const int64_t per_row = total / counters.size(0);
  const uint32_t sk = rng::seed_key(seed);
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* cp = c.data_ptr<int64_t>();
  out_t* dst = out.data_ptr<out_t>();
  at::parallel_for(0, total, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      dst[i] = finish(rng::bits_at(rng::stream_key(rng::row_seed_key(sk, rs, i / per_row), sp[i / per_row], stream),
                                   cp[i]));
  });
  return out;
}

at::Tensor rng_bits_cpu(int64_t seed, const at::Tensor& sample_index, int64_t stream, const at::Tensor& counters,
                        const std::optional<at::Tensor>& seeds) {
  return rng_cpu<int64_t>("rng_bits", seed, sample_index, stream, counters, seeds, at::kLong,
                          [](uint32_t b) { return int64_t(b); });
}

at::Tensor rng_uniform_cpu(int64_t seed, const at::Tensor& sample_index, int64_t stream, const at::Tensor& counters,
                           const std::optional<at::Tensor>& seeds) {
  return rng_cpu<float>("rng_uniform", seed, sample_index, stream, counters, seeds, at::kFloat,
                        [](uint32_t b) { return rng::to_uniform(b); });
}

void posterior_step_cpu(const at::Tensor& logits_c, const std::optional<at::Tensor>& logits_u, const at::Tensor& x_t,
                        at::Tensor& out, double cfg, double temperature, int64_t t, int64_t t_next,
                        const at::Tensor& k_final, const at::Tensor& b_final, const at::Tensor& beta, int64_t seed,
                        const at::Tensor& sample_index, int64_t stream, const at::Tensor& token_index, bool greedy,
                        const std::optional<at::Tensor>& seeds) {
  const PosteriorArgs a = check_posterior_args(logits_c, logits_u, x_t, out, t, t_next, k_final, b_final, beta,
                                               sample_index, token_index);
  at::Tensor seeds_hold;
  const int64_t* rs = row_seeds("posterior_step", seeds, sample_index, seeds_hold);
  const at::Tensor lc = logits_c.contiguous();
  const at::Tensor lu = logits_u.has_value() ? logits_u->contiguous() : at::Tensor();
  const at::Tensor x = x_t.contiguous();
  const at::Tensor si = sample_index.to(at::kLong).contiguous();
  const at::Tensor ti = token_index.to(at::kLong).contiguous();
  const int64_t total = a.M * a.K;
  if (total == 0) return;
  const bool last = t_next <= 0;
  const at::Tensor betac = beta.contiguous();
  const float* bp = betac.data_ptr<float>();
  const float like_one = last ? 1.0f : sampling::compose_likelihood(1.0f, bp, t, t_next);
  const float like_zero = last ? 0.0f : sampling::compose_likelihood(0.0f, bp, t, t_next);
  const float k_next = last ? 1.0f : k_final.contiguous().data_ptr<float>()[t_next];
  const float b_next = last ? 0.0f : b_final.contiguous().data_ptr<float>()[t_next];
  const float cfg_f = static_cast<float>(cfg), temp_f = static_cast<float>(temperature);
  const uint32_t sk = rng::seed_key(seed);
  const bool x_u8 = x.scalar_type() != at::kFloat, out_u8 = out.scalar_type() != at::kFloat;
  const int64_t K = a.K, n = a.n;
  const int64_t* sp = si.data_ptr<int64_t>();
  const int64_t* tp = ti.data_ptr<int64_t>();
  const float* xf = x_u8 ? nullptr : x.data_ptr<float>();
  const uint8_t* xb = x_u8 ? static_cast<const uint8_t*>(x.data_ptr()) : nullptr;
  float* of = out_u8 ? nullptr : out.data_ptr<float>();
  uint8_t* ob = out_u8 ? static_cast<uint8_t*>(out.data_ptr()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "posterior_step", [&] {
    const scalar_t* lcp = lc.data_ptr<scalar_t>();
    const scalar_t* lup = lu.defined() ? lu.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, total, 16384, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t m = i / K;
        const bool xv = x_u8 ? xb[i] != 0 : xf[i] != 0.0f;
        const float l = sampling::guided_logit(static_cast<float>(lcp[i]), lup ? static_cast<float>(lup[i]) : 0.0f,
                                               lup != nullptr, cfg_f, temp_f);
        const float p0 = sampling::flip_to_p0(sampling::sigmoid(l), xv);
        if (last) {
          of[i] = p0;
          continue;
        }
        const float post = sampling::posterior(p0, xv, k_next, b_next, like_one, like_zero);
        bool bit;
        if (greedy) {
          bit = post > 0.5f;
        } else {
          const uint32_t key = rng::stream_key(rng::row_seed_key(sk, rs, m / n), sp[m / n], stream);
          bit = rng::to_uniform(rng::bits_at(key, tp[m] * K + (i - m * K))) < post;
        }
        if (out_u8) ob[i] = bit;
        else of[i] = bit ? 1.0f : 0.0f;
      }
    });
  });
}

void unmask_topk_cpu(const at::Tensor& p0, const at::Tensor& index, const at::Tensor& k, at::Tensor& codes,
                     at::Tensor& mask, double gumbel_temp, int64_t seed, const at::Tensor& sample_index,
                     int64_t gumbel_stream, int64_t bits_stream, bool deterministic,
                     const std::optional<at::Tensor>& seeds) {
  const UnmaskArgs a = check_unmask_args(p0, index, k, codes, mask, sample_index);
  at::Tensor seeds_hold;
  const int64_t* rs = row_seeds("unmask_topk", seeds, sample_index, seeds_hold);
  const int64_t B = a.B, n = a.n, N = a.N, K = a.K;
  if (B == 0 || n == 0) return;
  const at::Tensor pc = p0.contiguous();
  const at::Tensor ic = index.to(at::kLong).contiguous();
  const at::Tensor kc = k.to(at::kLong).contiguous();
  const at::Tensor sc = sample_index.to(at::kLong).contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t e = 0; e < B * n; ++e)
    BIGR_CHECK(ip[e] >= 0 && ip[e] < N, "unmask_topk: candidate position ", ip[e], " is outside 0..", N - 1);
  const float* pp = pc.data_ptr<float>();
  const int64_t* kp = kc.data_ptr<int64_t>();
  const int64_t* sp = sc.data_ptr<int64_t>();
  bool* mp = mask.data_ptr<bool>();
  const float gt = static_cast<float>(gumbel_temp);
  const bool noise = gumbel_temp > 0;
  const uint32_t sk = rng::seed_key(seed);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, codes.scalar_type(), "unmask_topk", [&] {
    scalar_t* cp = codes.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(n * K, 1)), [&](int64_t lo, int64_t hi) {
      std::vector<uint64_t> keys(n);
      for (int64_t b = lo; b < hi; ++b) {
        const int64_t* pos = ip + b * n;
        const float* prow = pp + b * n * K;
        const uint32_t rk = rng::row_seed_key(sk, rs, b);
        const uint32_t gkey = rng::stream_key(rk, sp[b], gumbel_stream);
        const uint32_t bkey = rng::stream_key(rk, sp[b], bits_stream);
        for (int64_t i = 0; i < n; ++i) {
          float c = sampling::confidence(prow + i * K, K);
          if (noise) c = fp::add(c, fp::mul(gt, rng::to_gumbel(rng::to_uniform(rng::bits_at(gkey, pos[i])))));
          const bool open = mp[b * N + pos[i]];
          keys[i] = sampling::order_key(open ? c : -INFINITY, static_cast<uint32_t>(i), !open);
        }
        const int64_t kb = std::clamp<int64_t>(kp[b], 0, n);
        if (kb == 0) continue;
        std::nth_element(keys.begin(), keys.begin() + (kb - 1), keys.end());
        for (int64_t r = 0; r < kb; ++r) {
          if (sampling::key_blocked(keys[r])) continue;
          const int64_t i = sampling::key_index(keys[r]);
          const int64_t p = pos[i];
          for (int64_t j = 0; j < K; ++j) {
            const float q = prow[i * K + j];
            const bool bit = deterministic ? q > 0.5f : rng::to_uniform(rng::bits_at(bkey, p * K + j)) < q;
            cp[(b * N + p) * K + j] = static_cast<scalar_t>(bit ? 1 : 0);
          }
          mp[b * N + p] = false;
        }
      }
    });
  });
}

}  // namespace bigr

TORCH_LIBRARY_IMPL(bigr, CPU, m) {
  m.impl("rng_bits", &bigr::rng_bits_cpu);
  m.impl("rng_uniform", &bigr::rng_uniform_cpu);
  m.impl("posterior_step", &bigr::posterior_step_cpu);
  m.impl("unmask_topk", &bigr::unmask_topk_cpu);
}
