// The Python module: importing it registers the ops (TORCH_LIBRARY initialisers) and exposes build facts.
#include <pybind11/pybind11.h>

#ifndef BIGR_WITH_CUDA
#define BIGR_WITH_CUDA 0
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "bigr-engine custom ops (registered under torch.ops.bigr)";
  m.def("build_info", []() {
    pybind11::dict d;
    d["torch_version"] = BIGR_TORCH_VERSION;
    d["with_cuda"] = static_cast<bool>(BIGR_WITH_CUDA);
    d["cuda_archs"] = BIGR_CUDA_ARCHS;
#if defined(__clang__)
    d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = "gcc " __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    return d;
  });
}
