// Function multi-versioning for the hand-vectorised CPU kernels (cauchy.cpp, dplr_spectrum.cpp).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// ISA names, not arch=: an "arch=" clone is picked by CPU model (__builtin_cpu_is), which
// virtual machines often hide, while ISA clones test the CPUID feature bits
#define MMSSM_CLONES __attribute__((target_clones("avx512f", "avx2", "fma", "default")))
#else
#define MMSSM_CLONES
#endif
#if defined(__GNUC__)
#define MMSSM_INLINE inline __attribute__((always_inline))
#else
#define MMSSM_INLINE inline
#endif
