// CPU kernels: pack_bits / unpack_bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"

namespace bigr {

template <typename word_t>
static void pack_rows(const uint8_t* bits, word_t* words, int64_t rows, int64_t K) {
  at::parallel_for(0, rows, 4096, [&](int64_t lo, int64_t hi) {
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
  at::parallel_for(0, rows, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const uint64_t w = static_cast<uint64_t>(words[r]);
      uint8_t* b = bits + r * K;
      for (int64_t j = 0; j < K; ++j) b[j] = static_cast<uint8_t>((w >> j) & 1u);
    }
  });
}

at::Tensor pack_bits_cpu(const at::Tensor& bits) {
  BIGR_CHECK(bits.dim() >= 1, "pack_bits: codes need a last dimension of bits, got a 0-d tensor");
  const int64_t K = bits.size(-1);
  check_bit_width("pack_bits", K);
  const at::Tensor b = bits.ne(0).to(at::kByte).contiguous();
  auto shape = bits.sizes().vec();
  shape.pop_back();
  at::Tensor words = at::empty(shape, bits.options().dtype(word_dtype(K)));
  const int64_t rows = words.numel();
  if (K <= 32) pack_rows<int32_t>(b.data_ptr<uint8_t>(), words.data_ptr<int32_t>(), rows, K);
  else pack_rows<int64_t>(b.data_ptr<uint8_t>(), words.data_ptr<int64_t>(), rows, K);
  return words;
}

at::Tensor unpack_bits_cpu(const at::Tensor& words, int64_t K) {
  check_bit_width("unpack_bits", K);
  BIGR_CHECK(words.scalar_type() == word_dtype(K), "unpack_bits: ", K, "-bit codes are packed in ",
             K <= 32 ? "int32" : "int64", " words, got ", words.scalar_type(), "; pass the K the words were packed with");
  const at::Tensor w = words.contiguous();
  auto shape = words.sizes().vec();
  shape.push_back(K);
  at::Tensor bits = at::empty(shape, words.options().dtype(at::kByte));
  const int64_t rows = w.numel();
  if (K <= 32) unpack_rows<int32_t>(w.data_ptr<int32_t>(), bits.data_ptr<uint8_t>(), rows, K);
  else unpack_rows<int64_t>(w.data_ptr<int64_t>(), bits.data_ptr<uint8_t>(), rows, K);
  return bits;
}

}  // namespace bigr

TORCH_LIBRARY_IMPL(bigr, CPU, m) {
  m.impl("pack_bits", &bigr::pack_bits_cpu);
  m.impl("unpack_bits", &bigr::unpack_bits_cpu);
}
