"""Builds the native extension `prefprune._C`; all metadata lives in pyproject.toml.

Build against the torch you run with: `pip install -e . --no-build-isolation`.

Env switches:
  PREFPRUNE_SKIP_EXT=1      build nothing native (prefprune still imports and uses references)
  PREFPRUNE_FORCE_CUDA=1    compile the CUDA sources even when no GPU is visible (needs a CUDA
                            torch and a CUDA toolkit; without TORCH_CUDA_ARCH_LIST: "8.0;9.0+PTX")
  PREFPRUNE_DEBUG=1         -O0 -g build (and -lineinfo for CUDA)
  TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured by torch.utils.cpp_extension.

The CUDA build (CUDAExtension, -DWITH_CUDA, csrc/*.cu and csrc/*_cuda.cpp) is chosen when torch
has CUDA, a toolkit is found (CUDA_HOME) and a GPU is visible, or when forced; otherwise a
CPU-only CppExtension. Nothing is downloaded and no dependency depends on the hardware.
"""

import glob
import os

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("PREFPRUNE_FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError(f"PREFPRUNE_FORCE_CUDA=1 but torch {torch.__version__} was built without CUDA")
        if CUDA_HOME is None:
            raise RuntimeError("PREFPRUNE_FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch picks the archs of visible GPUs; with none it has nothing to pick.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


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
