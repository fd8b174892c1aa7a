// CUDA kernels of the generation loop: rng_bits / rng_uniform, posterior_step (one thread per bit),
// unmask_topk (one block per row: confidences, a bitonic sort in shared memory, then the chosen tokens' bits).
// Bit-identical to the CPU kernels: the shared arithmetic in sampling.h uses _rn intrinsics here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "sampling.h"
#include "sampling_checks.h"

namespace bigr {

static unsigned sampling_blocks(int64_t n, int threads) {
  return static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

template <bool uniform>
__global__ void rng_kernel(uint32_t seed_k, const int64_t* __restrict__ seeds,
                           const int64_t* __restrict__ sample_index, int64_t stream,
                           const int64_t* __restrict__ counters, void* __restrict__ out, int64_t total,
                           int64_t per_row) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row;
    const uint32_t bits = rng::bits_at(rng::stream_key(rng::row_seed_key(seed_k, seeds, row), sample_index[row], stream),
                                       counters[i]);
    if (uniform) static_cast<float*>(out)[i] = rng::to_uniform(bits);
    else static_cast<int64_t*>(out)[i] = bits;
  }
}

template <bool uniform>
static at::Tensor rng_cuda(int64_t seed, const at::Tensor& sample_index, int64_t stream, const at::Tensor& counters,
                           const std::optional<at::Tensor>& seeds) {
  check_rng_args(uniform ? "rng_uniform" : "rng_bits", sample_index, counters);
  at::Tensor seeds_hold;
  const int64_t* rs = row_seeds(uniform ? "rng_uniform" : "rng_bits", seeds, sample_index, seeds_hold);
  const c10::cuda::CUDAGuard guard(counters.device());
  const at::Tensor s = sample_index.to(at::kLong).contiguous();
  const at::Tensor c = counters.to(at::kLong).contiguous();
  at::Tensor out = at::empty(counters.sizes(), counters.options().dtype(uniform ? at::kFloat : at::kLong));
  const int64_t total = c.numel();
  if (total == 0) return out;
  rng_kernel<uniform><<<sampling_blocks(total, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      rng::seed_key(seed), rs, s.data_ptr<int64_t>(), stream, c.data_ptr<int64_t>(), out.data_ptr(), total,
      total / counters.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor rng_bits_cuda(int64_t seed, const at::Tensor& sample_index, int64_t stream, const at::Tensor& counters,
                         const std::optional<at::Tensor>& seeds) {
  return rng_cuda<false>(seed, sample_index, stream, counters, seeds);
}

at::Tensor rng_uniform_cuda(int64_t seed, const at::Tensor& sample_index, int64_t stream, const at::Tensor& counters,
                            const std::optional<at::Tensor>& seeds) {
  return rng_cuda<true>(seed, sample_index, stream, counters, seeds);
}

struct PosteriorParams {
  float cfg, temperature;
  int64_t t, t_next;
  const float *k_final, *b_final, *beta;
  uint32_t seed_k;
  const int64_t *seeds, *sample_index, *token_index;  // seeds: per-row seeds or nullptr
  int64_t stream, total, K, n;
  bool last, greedy, x_u8, out_u8;
};

template <typename scalar_t>
__global__ void posterior_kernel(const scalar_t* __restrict__ lc, const scalar_t* __restrict__ lu,
                                 const void* __restrict__ x, void* __restrict__ out, PosteriorParams a) {
  __shared__ float table[4];  // like_one, like_zero, k_(t'), b_(t')
  if (!a.last) {
    if (threadIdx.x == 0) {
      table[0] = sampling::compose_likelihood(1.0f, a.beta, a.t, a.t_next);
      table[1] = sampling::compose_likelihood(0.0f, a.beta, a.t, a.t_next);
      table[2] = a.k_final[a.t_next];
      table[3] = a.b_final[a.t_next];
    }
    __syncthreads();
  }
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < a.total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / a.K;
    const bool xv = a.x_u8 ? static_cast<const uint8_t*>(x)[i] != 0 : static_cast<const float*>(x)[i] != 0.0f;
    const float l = sampling::guided_logit(static_cast<float>(lc[i]), lu ? static_cast<float>(lu[i]) : 0.0f,
                                           lu != nullptr, a.cfg, a.temperature);
    const float p0 = sampling::flip_to_p0(sampling::sigmoid(l), xv);
    if (a.last) {
      static_cast<float*>(out)[i] = p0;
      continue;
    }
    const float post = sampling::posterior(p0, xv, table[2], table[3], table[0], table[1]);
    bool bit;
    if (a.greedy) {
      bit = post > 0.5f;
    } else {
      const uint32_t key = rng::stream_key(rng::row_seed_key(a.seed_k, a.seeds, m / a.n), a.sample_index[m / a.n],
                                           a.stream);
      bit = rng::to_uniform(rng::bits_at(key, a.token_index[m] * a.K + (i - m * a.K))) < post;
    }
    if (a.out_u8) static_cast<uint8_t*>(out)[i] = bit;
    else static_cast<float*>(out)[i] = bit ? 1.0f : 0.0f;
  }
}

void posterior_step_cuda(const at::Tensor& logits_c, const std::optional<at::Tensor>& logits_u, const at::Tensor& x_t,
                         at::Tensor& out, double cfg, double temperature, int64_t t, int64_t t_next,
                         const at::Tensor& k_final, const at::Tensor& b_final, const at::Tensor& beta, int64_t seed,
                         const at::Tensor& sample_index, int64_t stream, const at::Tensor& token_index, bool greedy,
                         const std::optional<at::Tensor>& seeds) {
  const PosteriorArgs args = check_posterior_args(logits_c, logits_u, x_t, out, t, t_next, k_final, b_final, beta,
                                                  sample_index, token_index);
  at::Tensor seeds_hold;
  const int64_t* rs = row_seeds("posterior_step", seeds, sample_index, seeds_hold);
  const c10::cuda::CUDAGuard guard(logits_c.device());
  const at::Tensor lc = logits_c.contiguous();
  const at::Tensor lu = logits_u.has_value() ? logits_u->contiguous() : at::Tensor();
  const at::Tensor x = x_t.contiguous();
  const at::Tensor si = sample_index.to(at::kLong).contiguous();
  const at::Tensor ti = token_index.to(at::kLong).contiguous();
  const at::Tensor kf = k_final.contiguous(), bf = b_final.contiguous(), be = beta.contiguous();
  PosteriorParams a;
  a.cfg = static_cast<float>(cfg);
  a.temperature = static_cast<float>(temperature);
  a.t = t;
  a.t_next = t_next;
  a.k_final = kf.data_ptr<float>();
  a.b_final = bf.data_ptr<float>();
  a.beta = be.data_ptr<float>();
  a.seed_k = rng::seed_key(seed);
  a.seeds = rs;
  a.sample_index = si.data_ptr<int64_t>();
  a.token_index = ti.data_ptr<int64_t>();
  a.stream = stream;
  a.total = args.M * args.K;
  a.K = args.K;
  a.n = args.n;
  a.last = t_next <= 0;
  a.greedy = greedy;
  a.x_u8 = x.scalar_type() != at::kFloat;
  a.out_u8 = out.scalar_type() != at::kFloat;
  if (a.total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "posterior_step", [&] {
    posterior_kernel<scalar_t><<<sampling_blocks(a.total, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        lc.data_ptr<scalar_t>(), lu.defined() ? lu.data_ptr<scalar_t>() : nullptr, x.data_ptr(), out.data_ptr(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Candidates per row that fit the shared-memory sort (4096 keys of 8 bytes).
constexpr int64_t kMaxCandidates = 4096;

struct UnmaskParams {
  const float* p0;
  const int64_t *index, *k, *sample_index, *seeds;  // seeds: per-row seeds or nullptr
  bool* mask;
  float gumbel_temp;
  bool noise, deterministic;
  uint32_t seed_k;
  int64_t gumbel_stream, bits_stream, n, N, K;
  int P;  // n rounded up to a power of two
};

template <typename code_t>
__global__ void unmask_kernel(code_t* __restrict__ codes, UnmaskParams a) {
  extern __shared__ uint64_t keys[];
  const int64_t b = blockIdx.x;
  const int64_t* pos = a.index + b * a.n;
  const float* prow = a.p0 + b * a.n * a.K;
  bool* mrow = a.mask + b * a.N;
  const uint32_t rk = rng::row_seed_key(a.seed_k, a.seeds, b);
  const uint32_t gkey = rng::stream_key(rk, a.sample_index[b], a.gumbel_stream);
  for (int i = threadIdx.x; i < a.P; i += blockDim.x) {
    uint64_t key = ~0ull;  // padding sorts last
    if (i < a.n) {
      float c = sampling::confidence(prow + i * a.K, a.K);
      if (a.noise) c = fp::add(c, fp::mul(a.gumbel_temp, rng::to_gumbel(rng::to_uniform(rng::bits_at(gkey, pos[i])))));
      CUDA_KERNEL_ASSERT(pos[i] >= 0 && pos[i] < a.N);
      const bool open = mrow[pos[i]];
      key = sampling::order_key(open ? c : -INFINITY, static_cast<uint32_t>(i), !open);
    }
    keys[i] = key;
  }
  __syncthreads();
  for (int size = 2; size <= a.P; size <<= 1) {  // bitonic sort, ascending
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < a.P; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const uint64_t u = keys[i], v = keys[j];
          if ((u > v) == ((i & size) == 0)) {
            keys[i] = v;
            keys[j] = u;
          }
        }
      }
      __syncthreads();
    }
  }
  const int64_t kb = a.k[b] < 0 ? 0 : (a.k[b] > a.n ? a.n : a.k[b]);
  const uint32_t bkey = rng::stream_key(rk, a.sample_index[b], a.bits_stream);
  for (int64_t e = threadIdx.x; e < kb * a.K; e += blockDim.x) {
    const int64_t r = e / a.K, j = e - r * a.K;
    const uint64_t key = keys[r];
    if (sampling::key_blocked(key)) continue;
    const int64_t i = sampling::key_index(key), p = pos[i];
    const float q = prow[i * a.K + j];
    const bool bit = a.deterministic ? q > 0.5f : rng::to_uniform(rng::bits_at(bkey, p * a.K + j)) < q;
    codes[(b * a.N + p) * a.K + j] = static_cast<code_t>(bit ? 1.0f : 0.0f);
    if (j == 0) mrow[p] = false;
  }
}

void unmask_topk_cuda(const at::Tensor& p0, const at::Tensor& index, const at::Tensor& k, at::Tensor& codes,
                      at::Tensor& mask, double gumbel_temp, int64_t seed, const at::Tensor& sample_index,
                      int64_t gumbel_stream, int64_t bits_stream, bool deterministic,
                      const std::optional<at::Tensor>& seeds) {
  const UnmaskArgs args = check_unmask_args(p0, index, k, codes, mask, sample_index);
  at::Tensor seeds_hold;
  const int64_t* rs = row_seeds("unmask_topk", seeds, sample_index, seeds_hold);
  BIGR_CHECK(args.n <= kMaxCandidates, "unmask_topk: the CUDA kernel sorts at most ", kMaxCandidates,
             " candidates per row in shared memory, got n=", args.n);
  if (args.B == 0 || args.n == 0) return;
  const c10::cuda::CUDAGuard guard(p0.device());
  const at::Tensor pc = p0.contiguous();
  const at::Tensor ic = index.to(at::kLong).contiguous();
  const at::Tensor kc = k.to(at::kLong).contiguous();
  const at::Tensor sc = sample_index.to(at::kLong).contiguous();
  UnmaskParams a;
  a.p0 = pc.data_ptr<float>();
  a.index = ic.data_ptr<int64_t>();
  a.k = kc.data_ptr<int64_t>();
  a.sample_index = sc.data_ptr<int64_t>();
  a.seeds = rs;
  a.mask = mask.data_ptr<bool>();
  a.gumbel_temp = static_cast<float>(gumbel_temp);
  a.noise = gumbel_temp > 0;
  a.deterministic = deterministic;
  a.seed_k = rng::seed_key(seed);
  a.gumbel_stream = gumbel_stream;
  a.bits_stream = bits_stream;
  a.n = args.n;
  a.N = args.N;
  a.K = args.K;
  a.P = 1;
  while (a.P < args.n) a.P <<= 1;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(a.P / 2, 32), 512));
  const size_t shared = static_cast<size_t>(a.P) * sizeof(uint64_t);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, codes.scalar_type(), "unmask_topk", [&] {
    unmask_kernel<scalar_t><<<static_cast<unsigned>(args.B), threads, shared, at::cuda::getCurrentCUDAStream()>>>(
        codes.data_ptr<scalar_t>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace bigr

TORCH_LIBRARY_IMPL(bigr, CUDA, m) {
  m.impl("rng_bits", &bigr::rng_bits_cuda);
  m.impl("rng_uniform", &bigr::rng_uniform_cuda);
  m.impl("posterior_step", &bigr::posterior_step_cuda);
  m.impl("unmask_topk", &bigr::unmask_topk_cuda);
}
