// Every op of the `bigr` namespace: schemas only. Kernels live in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(bigr, m) {
  // Binary codes (..., K) with K <= 64 -> one word per token (int32 for K <= 32, int64 above); bit j = code[..., j].
  m.def("pack_bits(Tensor bits) -> Tensor");
  // Words (...) -> codes (..., K) uint8; inverse of pack_bits.
  m.def("unpack_bits(Tensor words, int K) -> Tensor");
}
