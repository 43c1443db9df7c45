"""Builds the native extension `prefprune._C`; all metadata lives in pyproject.toml.

Build against the torch you run with: `pip install -e . --no-build-isolation`.

Env switches:
  PREFPRUNE_SKIP_EXT=1      build nothing native (prefprune still imports and uses references)
  PREFPRUNE_FORCE_CUDA=1    require the CUDA build: fail (saying why) unless torch has CUDA and a toolkit
                            is found, instead of falling back to the CPU build
  PREFPRUNE_DEBUG=1         -O0 -g build (and -lineinfo for CUDA)
  TORCH_CUDA_ARCH_LIST      GPU architectures to compile for (default below); MAX_JOBS: parallel compiles.
  CUDA_HOME                 the toolkit (else torch looks for nvcc on PATH and in /usr/local/cuda).

The CUDA build (CUDAExtension, -DWITH_CUDA, csrc/*.cu and csrc/*_cuda.cpp) is chosen from the *build
environment*, as flash-attention and torchao do: torch built with CUDA and a CUDA toolkit found. No GPU is
probed, so a wheel built on a GPU-less host or in a container build has the same CUDA code as one built on
a GPU node. Without TORCH_CUDA_ARCH_LIST the architectures are DEFAULT_CUDA_ARCHS, never the build host's
GPUs. Which build was chosen, and why, is printed. Nothing is downloaded and no dependency depends on the
hardware.
"""

import glob
import os
import sys

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


# Turing (T4) to Hopper as machine code, plus PTX that later GPUs compile at load time. CUDA 13 has no
# Volta or older. Set TORCH_CUDA_ARCH_LIST for fewer (a faster build) or others.
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    why_not = []
    if torch.version.cuda is None:
        why_not.append(f"torch {torch.__version__} was built without CUDA")
    elif CUDA_HOME is None:  # torch leaves CUDA_HOME unset when it has no CUDA itself
        why_not.append("no CUDA toolkit was found (set CUDA_HOME, or put nvcc on PATH)")
    elif not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit.
        why_not.append(f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (set CUDA_HOME to the toolkit)")
    if why_not:
        if _flag("PREFPRUNE_FORCE_CUDA"):
            raise RuntimeError("PREFPRUNE_FORCE_CUDA=1 but " + "; ".join(why_not))
        print("prefprune: building the CPU-only extension: " + "; ".join(why_not), file=sys.stderr)
        return False
    # torch would otherwise compile for the GPUs it sees on the build host (or fail to choose with none).
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    print(f"prefprune: building the CUDA extension (torch CUDA {torch.version.cuda}, toolkit {CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={archs})", file=sys.stderr)
    return True


def _ext_modules():
    if _flag("PREFPRUNE_SKIP_EXT"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = _flag("PREFPRUNE_DEBUG")
    # -g0: the interpreter's CFLAGS carry -g, which makes a 12 MB .so for no use in a release build.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cpu_sources = [f for f in cpp if not f.endswith("_cuda.cpp")]
    if _want_cuda():
        nvcc = ["-O0", "-g", "-lineinfo"] if debug else ["-O3"]
        sources = cpp + sorted(glob.glob("csrc/*.cu"))
        ext = CUDAExtension(
            "prefprune._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    else:
        ext = CppExtension("prefprune._C", cpu_sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
