// The check macro and the checks every op family shares, written once.
#pragma once
#include <ATen/ATen.h>

#define BIGR_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)

namespace bigr {

inline void check_same_device(const char* op, const at::Tensor& a, const at::Tensor& b) {
  BIGR_CHECK(a.device() == b.device(), op, ": tensors are on different devices (", a.device(), " and ", b.device(), ")");
}

}  // namespace bigr
