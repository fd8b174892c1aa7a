// Function multi-versioning for the CPU kernels: hot loops are compiled for AVX-512 (x86-64-v4), AVX2 (v3) and the
// baseline, and the loader picks the best the CPU has; `flatten` inlines every helper into each clone so the vector
// width is chosen once per kernel, not per call.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BIGR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define BIGR_CPU_CLONES __attribute__((flatten))
#endif
#define BIGR_INLINE inline __attribute__((always_inline))
