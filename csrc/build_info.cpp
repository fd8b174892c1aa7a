// bigr::build_info: the build facts as one JSON object (the BIGR_* macros come from CMakeLists.txt; the defaults
// keep this file compilable on its own). An op rather than a Python binding: the library has no Python in it, so a
// C++ program and `torch.ops.load_library` load the same file.
#include <string>

#include "bigr/build_info.h"

#ifndef BIGR_WITH_CUDA
#define BIGR_WITH_CUDA 0
#endif
#ifndef BIGR_CUDA_ARCHS
#define BIGR_CUDA_ARCHS ""
#endif
#ifndef BIGR_CUDA_VERSION
#define BIGR_CUDA_VERSION ""
#endif
#ifndef BIGR_TORCH_VERSION
#define BIGR_TORCH_VERSION "unknown"
#endif
#ifndef BIGR_VERSION
#define BIGR_VERSION "unknown"
#endif

#if defined(__clang__)
#define BIGR_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define BIGR_COMPILER "gcc " __VERSION__
#else
#define BIGR_COMPILER "unknown"
#endif

namespace bigr {

std::string build_info_json() {
  // Every value is a plain literal without quotes or backslashes, so no escaping is needed.
  return std::string("{\"version\": \"") + BIGR_VERSION + "\", \"torch_version\": \"" + BIGR_TORCH_VERSION +
         "\", \"with_cuda\": " + (BIGR_WITH_CUDA ? "true" : "false") + ", \"cuda_archs\": \"" + BIGR_CUDA_ARCHS +
         "\", \"cuda_version\": \"" + BIGR_CUDA_VERSION + "\", \"compiler\": \"" + BIGR_COMPILER + "\"}";
}

}  // namespace bigr

// For programs that check the library before using it (the C++ pipeline does): a C symbol needs no torch headers.
extern "C" const char* bigr_ops_build_info() {
  static const std::string info = bigr::build_info_json();
  return info.c_str();
}
