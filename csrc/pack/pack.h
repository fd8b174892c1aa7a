// pack_bits / unpack_bits: the shape and dtype checks and the output allocation shared by the CPU and CUDA
// kernels, written once.
#pragma once
#include <ATen/ATen.h>

#include "bigr/checks.h"

namespace bigr {

// Words that hold K bits: int32 up to 32 bits, int64 above.
inline at::ScalarType word_dtype(int64_t K) { return K <= 32 ? at::kInt : at::kLong; }

inline void check_bit_width(const char* op, int64_t K) {
  BIGR_CHECK(K <= 64, op, ": K=", K, " bits per token is more than 64; codes wider than 64 bits do not fit in one "
             "word (split them into groups of at most 64 bits)");
  BIGR_CHECK(K >= 1, op, ": K=", K, " bits per token; K must be in 1..64");
}

// pack_bits input (..., K) -> K, checked.
inline int64_t check_pack_input(const at::Tensor& bits) {
  BIGR_CHECK(bits.dim() >= 1, "pack_bits: codes need a last dimension of K bits, got a 0-d tensor");
  const int64_t K = bits.size(-1);
  check_bit_width("pack_bits", K);
  return K;
}

// The codes as contiguous bytes, zero or nonzero: uint8/bool inputs as they are, other dtypes through `!= 0`
// (a bool tensor, one byte per element).
inline at::Tensor pack_input_bytes(const at::Tensor& bits) {
  const auto t = bits.scalar_type();
  return (t == at::kByte || t == at::kBool) ? bits.contiguous() : bits.ne(0).contiguous();
}

// pack_bits output: the leading shape of the codes, int32 or int64.
inline at::Tensor empty_words(const at::Tensor& bits, int64_t K) {
  auto shape = bits.sizes().vec();
  shape.pop_back();
  return at::empty(shape, bits.options().dtype(word_dtype(K)));
}

inline void check_unpack_input(const at::Tensor& words, int64_t K) {
  check_bit_width("unpack_bits", K);
  BIGR_CHECK(words.scalar_type() == word_dtype(K), "unpack_bits: ", K, "-bit codes are packed in ",
             K <= 32 ? "int32" : "int64", " words, got ", words.scalar_type(),
             "; pass the K the words were packed with");
}

// unpack_bits output: (..., K) uint8.
inline at::Tensor empty_bits(const at::Tensor& words, int64_t K) {
  auto shape = words.sizes().vec();
  shape.push_back(K);
  return at::empty(shape, words.options().dtype(at::kByte));
}

}  // namespace bigr
