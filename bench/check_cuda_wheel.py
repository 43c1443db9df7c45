"""Checks a CUDA wheel of prefprune built on a host without a GPU: install, import, solve, list the GPU code.

Usage: python bench/check_cuda_wheel.py DIST_DIR   (run with the Python whose CUDA torch built the wheel)

1. the one `prefprune-*.whl` in DIST_DIR is installed into a fresh venv (that Python's torch version from
   the package index, then the wheel without dependencies), outside this tree so nothing imports from it;
2. that venv imports `prefprune._C`, which must say it was built with CUDA, and solves a 3×3 system with
   the native CPU CG (no GPU is needed for that);
3. `cuobjdump --list-elf` on the installed `prefprune/_C*.so` must list sm_90 code, and the fused CG kernels
   must be among its functions (`cuobjdump --dump-elf-symbols`). cuobjdump comes from PATH, $CUDA_HOME/bin
   or Triton's NVIDIA backend, which ships one.
Prints the wheel's name and size, the import line and the cuobjdump lines; exits non-zero on any failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_IMPORT = (
    "import torch, prefprune._C as C; d = torch.float64; "
    "r = C.cg_factored(torch.eye(3, dtype=d), 3 * torch.ones(3, dtype=d), 1.0, torch.ones(3, 1, dtype=d), "
    "None, 1e-12, 10, False); "
    "print(C.__file__); print(C.build_info(), 'status', r[1].tolist(), 'x', r[0].flatten().tolist())"
)


def _run(cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, the toolkit, or the copy Triton's NVIDIA backend ships (a toolkit may lack it)."""
    toolkit = os.environ.get("CUDA_HOME", "")
    candidates = [shutil.which("cuobjdump"), os.path.join(toolkit, "bin", "cuobjdump") if toolkit else None]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        triton_dir = os.path.dirname(spec.origin)
        candidates.append(os.path.join(triton_dir, "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def main(dist: Path) -> None:
    import torch

    if torch.version.cuda is None:
        sys.exit(f"{sys.executable} has torch {torch.__version__} without CUDA: run with the building venv")
    wheels = sorted(dist.glob("prefprune-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"{dist}: expected one prefprune wheel, found {[w.name for w in wheels]}")
    wheel = wheels[0]
    print(f"wheel: {wheel.name}  {wheel.stat().st_size:,} bytes")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        sys.exit("cuobjdump not found: not on PATH, in $CUDA_HOME/bin, or in Triton's NVIDIA backend")
    with tempfile.TemporaryDirectory(prefix="prefprune-wheel-") as tmp:
        venv = Path(tmp) / "venv"
        _run([sys.executable, "-m", "venv", str(venv)])
        py = str(venv / "bin" / "python")
        torch_spec = f"torch=={torch.__version__.split('+')[0]}"
        _run([py, "-m", "pip", "install", "--isolated", "-q", torch_spec])
        _run([py, "-m", "pip", "install", "--isolated", "-q", "--no-deps", str(wheel)])
        out = _run([py, "-c", _IMPORT], cwd=tmp).splitlines()
        so, info = Path(out[0]), out[1]
        print(f"fresh venv import: {info}")
        if "CUDA" not in info or "status [0]" not in info or "x [0.5, 0.5, 0.5]" not in info:
            sys.exit(f"unexpected import result: {info}")
        if Path(tmp) not in so.parents:
            sys.exit(f"prefprune._C imported from {so}, not from the fresh venv")
        elf = _run([cuobjdump, "--list-elf", str(so)])
        print(elf.rstrip())
        if "sm_90" not in elf:
            sys.exit("no sm_90 ELF in the extension")
        symbols = _run([cuobjdump, "--dump-elf-symbols", "--gpu-architecture", "sm_90", str(so)])
        kernels = sorted({line.split()[-1] for line in symbols.splitlines() if "cg" in line.lower()
                          and "FUNC" in line})
        print(f"CG kernel functions in the sm_90 code: {len(kernels)}")
        for name in kernels:
            print(f"  {name}")
        if not kernels:
            sys.exit("no CG kernel functions in the sm_90 code")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
