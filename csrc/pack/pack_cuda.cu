// CUDA kernels: pack_bits / unpack_bits. One thread per token word; each block stages its rows' K bytes in shared
// memory so that the byte side (loads in pack, stores in unpack) is read/written with coalesced accesses too.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pack.h"

namespace bigr {

constexpr int kRowsPerBlock = 256;  // threads per block = words per block; the tile is at most 256 * 64 B = 16 KiB

template <typename word_t>
__global__ void pack_kernel(const uint8_t* __restrict__ bits, word_t* __restrict__ words, int64_t rows, int K) {
  extern __shared__ uint8_t tile[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int n = static_cast<int>(min(static_cast<int64_t>(kRowsPerBlock), rows - row0));
  const uint8_t* src = bits + row0 * K;
  for (int i = threadIdx.x; i < n * K; i += blockDim.x) tile[i] = src[i];
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < n) {
    const uint8_t* b = tile + threadIdx.x * K;
    uint64_t w = 0;
    for (int j = 0; j < K; ++j) w |= static_cast<uint64_t>(b[j] != 0) << j;
    words[row0 + threadIdx.x] = static_cast<word_t>(w);
  }
}

template <typename word_t>
__global__ void unpack_kernel(const word_t* __restrict__ words, uint8_t* __restrict__ bits, int64_t rows, int K) {
  extern __shared__ uint8_t tile[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int n = static_cast<int>(min(static_cast<int64_t>(kRowsPerBlock), rows - row0));
  if (static_cast<int>(threadIdx.x) < n) {
    const uint64_t w = static_cast<uint64_t>(words[row0 + threadIdx.x]);
    uint8_t* b = tile + threadIdx.x * K;
    for (int j = 0; j < K; ++j) b[j] = static_cast<uint8_t>((w >> j) & 1u);
  }
  __syncthreads();
  uint8_t* dst = bits + row0 * K;
  for (int i = threadIdx.x; i < n * K; i += blockDim.x) dst[i] = tile[i];
}

at::Tensor pack_bits_cuda(const at::Tensor& bits) {
  const int64_t K = check_pack_input(bits);
  const c10::cuda::CUDAGuard guard(bits.device());
  const at::Tensor b = pack_input_bytes(bits);
  at::Tensor words = empty_words(bits, K);
  const int64_t rows = words.numel();
  if (rows == 0) return words;
  const auto blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  const size_t smem = kRowsPerBlock * K;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* src = static_cast<const uint8_t*>(b.data_ptr());
  if (K <= 32)
    pack_kernel<int32_t><<<blocks, kRowsPerBlock, smem, stream>>>(src, words.data_ptr<int32_t>(), rows, int(K));
  else
    pack_kernel<int64_t><<<blocks, kRowsPerBlock, smem, stream>>>(src, words.data_ptr<int64_t>(), rows, int(K));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return words;
}

at::Tensor unpack_bits_cuda(const at::Tensor& words, int64_t K) {
  check_unpack_input(words, K);
  const c10::cuda::CUDAGuard guard(words.device());
  const at::Tensor w = words.contiguous();
  at::Tensor bits = empty_bits(words, K);
  const int64_t rows = w.numel();
  if (rows == 0) return bits;
  const auto blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  const size_t smem = kRowsPerBlock * K;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto* dst = bits.data_ptr<uint8_t>();
  if (K <= 32)
    unpack_kernel<int32_t><<<blocks, kRowsPerBlock, smem, stream>>>(w.data_ptr<int32_t>(), dst, rows, int(K));
  else
    unpack_kernel<int64_t><<<blocks, kRowsPerBlock, smem, stream>>>(w.data_ptr<int64_t>(), dst, rows, int(K));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bits;
}

}  // namespace bigr

TORCH_LIBRARY_IMPL(bigr, CUDA, m) {
  m.impl("pack_bits", &bigr::pack_bits_cuda);
  m.impl("unpack_bits", &bigr::unpack_bits_cuda);
}
