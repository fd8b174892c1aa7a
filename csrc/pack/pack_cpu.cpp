// CPU kernels: pack_bits / unpack_bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pack.h"

namespace bigr {

constexpr int64_t kGrain = 4096;  // rows per at::parallel_for task

template <typename word_t>
static void pack_rows(const uint8_t* bits, word_t* words, int64_t rows, int64_t K) {
  at::parallel_for(0, rows, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      uint64_t w = 0;
      const uint8_t* b = bits + r * K;
      for (int64_t j = 0; j < K; ++j) w |= static_cast<uint64_t>(b[j] != 0) << j;
      words[r] = static_cast<word_t>(w);
    }
  });
}

template <typename word_t>
static void unpack_rows(const word_t* words, uint8_t* bits, int64_t rows, int64_t K) {
  at::parallel_for(0, rows, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const uint64_t w = static_cast<uint64_t>(words[r]);
      uint8_t* b = bits + r * K;
      for (int64_t j = 0; j < K; ++j) b[j] = static_cast<uint8_t>((w >> j) & 1u);
    }
  });
}

at::Tensor pack_bits_cpu(const at::Tensor& bits) {
  const int64_t K = check_pack_input(bits);
  const at::Tensor b = pack_input_bytes(bits);
  at::Tensor words = empty_words(bits, K);
  const auto* src = static_cast<const uint8_t*>(b.data_ptr());
  if (K <= 32) pack_rows<int32_t>(src, words.data_ptr<int32_t>(), words.numel(), K);
  else pack_rows<int64_t>(src, words.data_ptr<int64_t>(), words.numel(), K);
  return words;
}

at::Tensor unpack_bits_cpu(const at::Tensor& words, int64_t K) {
  check_unpack_input(words, K);
  const at::Tensor w = words.contiguous();
  at::Tensor bits = empty_bits(words, K);
  if (K <= 32) unpack_rows<int32_t>(w.data_ptr<int32_t>(), bits.data_ptr<uint8_t>(), w.numel(), K);
  else unpack_rows<int64_t>(w.data_ptr<int64_t>(), bits.data_ptr<uint8_t>(), w.numel(), K);
  return bits;
}

}  // namespace bigr

TORCH_LIBRARY_IMPL(bigr, CPU, m) {
  m.impl("pack_bits", &bigr::pack_bits_cpu);
  m.impl("unpack_bits", &bigr::unpack_bits_cpu);
}
