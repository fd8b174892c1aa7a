// CUDA kernels: pack_bits / unpack_bits, one thread per token word.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"

namespace bigr {

template <typename word_t>
__global__ void pack_kernel(const uint8_t* __restrict__ bits, word_t* __restrict__ words, int64_t rows, int K) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const uint8_t* b = bits + r * K;
  uint64_t w = 0;
  for (int j = 0; j < K; ++j) w |= static_cast<uint64_t>(b[j] != 0) << j;
  words[r] = static_cast<word_t>(w);
}

// Threads own one output byte each so that stores are coalesced; the word is re-read from cache.
template <typename word_t>
__global__ void unpack_kernel(const word_t* __restrict__ words, uint8_t* __restrict__ bits, int64_t total, int K) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const uint64_t w = static_cast<uint64_t>(words[i / K]);
  bits[i] = static_cast<uint8_t>((w >> (i % K)) & 1u);
}

static unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

at::Tensor pack_bits_cuda(const at::Tensor& bits) {
  BIGR_CHECK(bits.dim() >= 1, "pack_bits: codes need a last dimension of bits, got a 0-d tensor");
  const int64_t K = bits.size(-1);
  check_bit_width("pack_bits", K);
  const c10::cuda::CUDAGuard guard(bits.device());
  const at::Tensor b = bits.ne(0).to(at::kByte).contiguous();
  auto shape = bits.sizes().vec();
  shape.pop_back();
  at::Tensor words = at::empty(shape, bits.options().dtype(word_dtype(K)));
  const int64_t rows = words.numel();
  if (rows == 0) return words;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (K <= 32)
    pack_kernel<int32_t><<<blocks_for(rows, 256), 256, 0, stream>>>(b.data_ptr<uint8_t>(), words.data_ptr<int32_t>(), rows, int(K));
  else
    pack_kernel<int64_t><<<blocks_for(rows, 256), 256, 0, stream>>>(b.data_ptr<uint8_t>(), words.data_ptr<int64_t>(), rows, int(K));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return words;
}

at::Tensor unpack_bits_cuda(const at::Tensor& words, int64_t K) {
  check_bit_width("unpack_bits", K);
  BIGR_CHECK(words.scalar_type() == word_dtype(K), "unpack_bits: ", K, "-bit codes are packed in ",
             K <= 32 ? "int32" : "int64", " words, got ", words.scalar_type(), "; pass the K the words were packed with");
  const c10::cuda::CUDAGuard guard(words.device());
  const at::Tensor w = words.contiguous();
  auto shape = words.sizes().vec();
  shape.push_back(K);
  at::Tensor bits = at::empty(shape, words.options().dtype(at::kByte));
  const int64_t total = bits.numel();
  if (total == 0) return bits;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (K <= 32)
    unpack_kernel<int32_t><<<blocks_for(total, 256), 256, 0, stream>>>(w.data_ptr<int32_t>(), bits.data_ptr<uint8_t>(), total, int(K));
  else
    unpack_kernel<int64_t><<<blocks_for(total, 256), 256, 0, stream>>>(w.data_ptr<int64_t>(), bits.data_ptr<uint8_t>(), total, int(K));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bits;
}

}  // namespace bigr

TORCH_LIBRARY_IMPL(bigr, CUDA, m) {
  m.impl("pack_bits", &bigr::pack_bits_cuda);
  m.impl("unpack_bits", &bigr::unpack_bits_cuda);
}
