// The ops library's build facts (csrc/build_info.cpp).
#pragma once
#include <string>

namespace bigr {
// {"version", "torch_version", "with_cuda", "cuda_archs", "cuda_version", "compiler"} as a JSON object.
std::string build_info_json();
}  // namespace bigr

extern "C" const char* bigr_ops_build_info();
