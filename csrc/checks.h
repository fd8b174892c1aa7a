// Shape and dtype checks shared by every kernel, written once.
#pragma once
#include <ATen/ATen.h>

#define BIGR_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)

namespace bigr {

// Words that hold K bits: int32 up to 32 bits, int64 above.
inline at::ScalarType word_dtype(int64_t K) { return K <= 32 ? at::kInt : at::kLong; }

inline void check_bit_width(const char* op, int64_t K) {
  BIGR_CHECK(K >= 1 && K <= 64, op, ": K=", K, " bits per token is outside 1..64; "
             "codes wider than 64 bits cannot be packed into one word");
}

inline void check_same_device(const char* op, const at::Tensor& a, const at::Tensor& b) {
  BIGR_CHECK(a.device() == b.device(), op, ": tensors are on different devices (", a.device(), " and ", b.device(), ")");
}

}  // namespace bigr
