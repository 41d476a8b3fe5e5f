/* The instruction-set paths a call can take (the module's `path` argument) and the copy of a function
 * compiled once per instruction set (float_ops.c, attention_prefill.c: ISA_SUFFIX) that a path runs. */
#ifndef BITNET_CPU_PATHS_H
#define BITNET_CPU_PATHS_H

enum path { PATH_SCALAR, PATH_AVX2, PATH_AVX512, PATH_NEON, PATH_NEONDOT, PATH_COUNT };

#if defined(__x86_64__)
#define ISA_COPY(path, name) ((path) == PATH_AVX512 ? name##_avx512 : (path) == PATH_AVX2 ? name##_avx2 : name##_generic)
#else
#define ISA_COPY(path, name) name##_generic
#endif

#endif
