// The Python module: importing it registers the ops (TORCH_LIBRARY initialisers) and exposes build facts.
// The BIGR_* macros come from CMakeLists.txt; the defaults below keep this file compilable on its own.
#include <pybind11/pybind11.h>

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "bigr-engine custom ops (registered under torch.ops.bigr)";
  m.def("build_info", []() {
    pybind11::dict d;
    d["torch_version"] = BIGR_TORCH_VERSION;  // the torch the module was compiled against
    d["with_cuda"] = static_cast<bool>(BIGR_WITH_CUDA);  // CUDA kernels compiled in
    d["cuda_archs"] = BIGR_CUDA_ARCHS;  // TORCH_CUDA_ARCH_LIST of the build, space separated ("" without CUDA)
    d["cuda_version"] = BIGR_CUDA_VERSION;  // nvcc version ("" without CUDA)
#if defined(__clang__)
    d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = "gcc " __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    return d;
  }, "Build metadata: torch_version, with_cuda, cuda_archs, cuda_version, compiler.");
}
