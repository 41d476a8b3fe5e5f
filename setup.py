"""Builds the CPU backend's C kernels (bitnet_tt.backends.cpu._kernels); everything else is in pyproject.toml.

Plain C11 and the CPython API only: nothing is built against PyTorch or numpy. Each instruction set has its
own translation units compiled with its own flags; the module picks one at run time (__builtin_cpu_supports),
so one build runs on any CPU of its architecture.
"""

from __future__ import annotations

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/bitnet_tt/backends/cpu/csrc"
COMMON_FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-pthread", "-Wno-psabi"]
NO_COMPILER = ("bitnet-tt: building the CPU kernels needs a C compiler (gcc or clang), and none worked: "
               "install one (e.g. 'apt install gcc') and install again")


def isa_units() -> list[tuple[str, str, list[str]]]:
    """(variant, source, flags) for the sources compiled once per instruction set of this machine's architecture."""
    machine = platform.machine().lower()
    units = [("generic", "float_ops.c", ["-DISA_SUFFIX=_generic"]),
             ("generic", "attention_prefill.c", ["-DISA_SUFFIX=_generic"])]
    if machine in ("x86_64", "amd64"):
        avx2 = ["-mavx2", "-mfma"]
        avx512 = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mprefer-vector-width=512"]
        units += [(variant, source, flags) for variant, flags in (("avx2", avx2), ("avx512", avx512))
                  for source in (f"tile_{variant}.c", f"gemm_{variant}.c")]
        units += [(variant, source, flags + [f"-DISA_SUFFIX=_{variant}"]) for variant, flags in (("avx2", avx2), ("avx512", avx512))
                  for source in ("float_ops.c", "attention_prefill.c")]
        units += [("avx512", "pack_avx512.c", avx512 + ["-mavx512vbmi"])]
    elif machine in ("aarch64", "arm64"):
        units += [("neon", "tile_neon.c", ["-DTILE_NAME=tile_neon"]),
                  ("neondot", "tile_neon.c", ["-march=armv8.2-a+dotprod", "-DTILE_NAME=tile_neondot"])]
    return units


class BuildKernels(build_ext):
    """Compiles the per-instruction-set units with their own flags and links them into the module."""

    def build_extension(self, ext):
        from distutils.errors import CCompilerError, DistutilsExecError, DistutilsPlatformError

        try:
            for variant, source, flags in isa_units():
                ext.extra_objects += self.compiler.compile(
                    [os.path.join(CSRC, source)], output_dir=os.path.join(self.build_temp, variant),
                    extra_postargs=COMMON_FLAGS + flags, depends=[os.path.join(CSRC, n) for n in ("kernels.h", "float_ops.h", "gemm.h", "pack.h", "fast_exp.h",
                                                                                 "attention_prefill.h", "scratch.h", "layers.h", "paths.h",
                                                                                 "vnni_avx512.h")],
                )
            super().build_extension(ext)
        except (CCompilerError, DistutilsExecError, DistutilsPlatformError) as exc:
            sys.exit(f"{NO_COMPILER} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")


kernels = Extension(
    "bitnet_tt.backends.cpu._kernels",
    sources=[os.path.join(CSRC, name) for name in ("module.c", "layers.c", "pool.c", "tile_scalar.c", "pack.c", "scratch.c")],
    # every source, so that a change to an instruction-set unit relinks the module
    depends=[os.path.join(CSRC, name) for name in sorted(os.listdir(CSRC))],
    extra_compile_args=COMMON_FLAGS,
    extra_link_args=["-pthread", "-lm"],
)

setup(ext_modules=[kernels], cmdclass={"build_ext": BuildKernels})
