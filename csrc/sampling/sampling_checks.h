// Argument checks of the sampling ops (rng_*, posterior_step, unmask_topk), shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>

#include "bigr/checks.h"

namespace bigr {

inline bool is_index_dtype(const at::Tensor& t) { return t.scalar_type() == at::kLong || t.scalar_type() == at::kInt; }

inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  BIGR_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimension(s), got shape ", t.sizes());
  BIGR_CHECK(is_index_dtype(t), op, ": ", name, " must be int64 or int32, got ", t.scalar_type());
}

inline void check_rng_args(const char* op, const at::Tensor& sample_index, const at::Tensor& counters) {
  check_index_tensor(op, "sample_index", sample_index, 1);
  BIGR_CHECK(is_index_dtype(counters), op, ": counters must be int64 or int32, got ", counters.scalar_type());
  BIGR_CHECK(counters.dim() >= 1 && counters.size(0) == sample_index.size(0), op,
             ": counters (B, ...) need one row per sample index, got counters ", counters.sizes(), " and ",
             sample_index.size(0), " sample indices");
  check_same_device(op, sample_index, counters);
}

// The optional per-row seeds (B,) int64 -> a contiguous int64 copy in `hold` and its pointer, or nullptr.
inline const int64_t* row_seeds(const char* op, const std::optional<at::Tensor>& seeds, const at::Tensor& sample_index,
                                at::Tensor& hold) {
  if (!seeds.has_value()) return nullptr;
  check_index_tensor(op, "seeds", *seeds, 1);
  BIGR_CHECK(seeds->size(0) == sample_index.size(0), op, ": seeds (B,) need one seed per sample index, got ",
             seeds->size(0), " and ", sample_index.size(0));
  check_same_device(op, sample_index, *seeds);
  hold = seeds->to(at::kLong).contiguous();
  return hold.data_ptr<int64_t>();
}

struct PosteriorArgs {
  int64_t M, K, n;  // M = B * n token rows of K bits; n tokens per sample
};

inline PosteriorArgs check_posterior_args(const at::Tensor& logits_c, const std::optional<at::Tensor>& logits_u,
                                          const at::Tensor& x_t, const at::Tensor& out, int64_t t, int64_t t_next,
                                          const at::Tensor& k_final, const at::Tensor& b_final, const at::Tensor& beta,
                                          const at::Tensor& sample_index, const at::Tensor& token_index) {
  const char* op = "posterior_step";
  BIGR_CHECK(logits_c.dim() >= 1 && logits_c.size(-1) >= 1, op, ": logits need a last dimension of K bits, got ",
             logits_c.sizes());
  BIGR_CHECK(at::isFloatingType(logits_c.scalar_type()), op, ": logits must be float32, bfloat16 or float16, got ",
             logits_c.scalar_type());
  if (logits_u.has_value()) {
    BIGR_CHECK(logits_u->sizes() == logits_c.sizes() && logits_u->scalar_type() == logits_c.scalar_type(), op,
               ": logits_u must match logits_c (", logits_c.sizes(), " ", logits_c.scalar_type(), "), got ",
               logits_u->sizes(), " ", logits_u->scalar_type());
    check_same_device(op, logits_c, *logits_u);
  }
  check_index_tensor(op, "token_index", token_index, 2);
  check_index_tensor(op, "sample_index", sample_index, 1);
  BIGR_CHECK(sample_index.size(0) == token_index.size(0), op, ": token_index (B, n) has B=", token_index.size(0),
             " rows but sample_index has ", sample_index.size(0));
  const int64_t K = logits_c.size(-1), n = token_index.size(1), M = token_index.size(0) * n;
  BIGR_CHECK(logits_c.numel() == M * K, op, ": logits ", logits_c.sizes(), " do not hold B*n=", M, " rows of K=", K,
             " bits (token_index ", token_index.sizes(), ")");
  const auto xd = x_t.scalar_type();
  BIGR_CHECK(xd == at::kFloat || xd == at::kByte || xd == at::kBool, op, ": x_t must be float32, uint8 or bool, got ",
             xd);
  BIGR_CHECK(x_t.numel() == M * K && x_t.size(-1) == K, op, ": x_t ", x_t.sizes(), " must hold the logits' ", M,
             " rows of ", K, " bits");
  const bool last = t_next <= 0;
  const auto od = out.scalar_type();
  BIGR_CHECK(last ? od == at::kFloat : (od == at::kFloat || od == at::kByte || od == at::kBool), op,
             last ? ": on the last step out receives p0 and must be float32, got "
                  : ": out receives x_(t') and must be float32, uint8 or bool, got ", od);
  BIGR_CHECK(out.numel() == M * K && out.size(-1) == K && out.is_contiguous(), op,
             ": out must be a contiguous tensor of ", M, " rows of ", K, " bits, got ", out.sizes(),
             out.is_contiguous() ? "" : " (not contiguous)");
  for (const at::Tensor* tab : {&k_final, &b_final, &beta}) {
    BIGR_CHECK(tab->dim() == 1 && tab->scalar_type() == at::kFloat && tab->size(0) == beta.size(0), op,
               ": the schedule tables k_final, b_final, beta must be float32 (T+1,) alike, got ", tab->sizes(), " ",
               tab->scalar_type());
    check_same_device(op, logits_c, *tab);
  }
  const int64_t T = beta.size(0) - 1;
  BIGR_CHECK(t >= 1 && t <= T && t_next < t, op, ": steps must satisfy 1 <= t <= T=", T,
             " and t_next < t (t_next <= 0: the last step), got t=", t, " t_next=", t_next);
  for (const at::Tensor* o : {&x_t, &out, &sample_index, &token_index}) check_same_device(op, logits_c, *o);
  at::assert_no_overlap(out, x_t);
  at::assert_no_overlap(out, logits_c);
  if (logits_u.has_value()) at::assert_no_overlap(out, *logits_u);
  return {M, K, n};
}

struct UnmaskArgs {
  int64_t B, n, N, K;
};

inline UnmaskArgs check_unmask_args(const at::Tensor& p0, const at::Tensor& index, const at::Tensor& k,
                                    const at::Tensor& codes, const at::Tensor& mask, const at::Tensor& sample_index) {
  const char* op = "unmask_topk";
  BIGR_CHECK(p0.dim() == 3 && p0.size(2) >= 1 && p0.scalar_type() == at::kFloat, op,
             ": p0 must be float32 (B, n, K) with K >= 1, got ", p0.sizes(),
             " ", p0.scalar_type());
  const int64_t B = p0.size(0), n = p0.size(1), K = p0.size(2);
  check_index_tensor(op, "index", index, 2);
  check_index_tensor(op, "k", k, 1);
  check_index_tensor(op, "sample_index", sample_index, 1);
  BIGR_CHECK(index.size(0) == B && index.size(1) == n, op, ": index must be (B, n) = (", B, ", ", n, ") like p0, got ",
             index.sizes());
  BIGR_CHECK(k.size(0) == B && sample_index.size(0) == B, op, ": k and sample_index need B=", B, " entries, got ",
             k.size(0), " and ", sample_index.size(0));
  BIGR_CHECK(codes.dim() == 3 && codes.size(0) == B && codes.size(2) == K && codes.is_contiguous(), op,
             ": codes must be a contiguous (B, N, K) tensor with B=", B, " K=", K, ", got ", codes.sizes());
  const auto cd = codes.scalar_type();
  BIGR_CHECK(cd == at::kFloat || cd == at::kHalf || cd == at::kBFloat16 || cd == at::kDouble || cd == at::kByte, op,
             ": codes must be a floating type or uint8, got ", cd);
  const int64_t N = codes.size(1);
  BIGR_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == N && mask.scalar_type() == at::kBool &&
             mask.is_contiguous(), op, ": mask must be a contiguous bool (B, N) = (", B, ", ", N, ") tensor, got ",
             mask.sizes(), " ", mask.scalar_type());
  BIGR_CHECK(n <= N, op, ": ", n, " candidates per row but only N=", N, " tokens");
  for (const at::Tensor* o : {&index, &k, &codes, &mask, &sample_index}) check_same_device(op, p0, *o);
  at::assert_no_overlap(codes, p0);
  return {B, n, N, K};
}

}  // namespace bigr
