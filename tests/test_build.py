"""Build of the native extension: setup.py's env switches, and (opt-in, slow) a wheel in a fresh venv."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Build and install checks: nearly every test here starts setup.py, pip or a fresh interpreter, so the
# whole file is in the slow tier.
pytestmark = pytest.mark.slow


def _setup(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PREFPRUNE_")} | env
    return subprocess.run(
        [sys.executable, "setup.py", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120
    )


def test_skip_ext_builds_nothing_native():
    proc = _setup("--version", PREFPRUNE_SKIP_EXT="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "0.1.0"


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_force_cuda_without_cuda_torch_says_why():
    proc = _setup("--version", PREFPRUNE_FORCE_CUDA="1")
    assert proc.returncode != 0
    assert f"PREFPRUNE_FORCE_CUDA=1 but torch {torch.__version__} was built without CUDA" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PREFPRUNE_TEST_WHEEL") != "1", reason="slow (~2 min): set PREFPRUNE_TEST_WHEEL=1"
)
def test_wheel_installs_and_imports_in_fresh_venv(tmp_path):
    """`pip wheel --no-build-isolation .`; a venv without system packages gets torch + wheel; import _C."""
    wheel_dir = tmp_path / "wheels"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(wheel_dir),
            ".",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheel_dir.glob("prefprune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("prefprune/_C") and n.endswith(".so") for n in names), names
    assert "prefprune/kernels/__init__.py" in names, names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    torch_spec = f"torch=={torch.__version__.split('+')[0]}"
    # torch with its dependencies; the wheel alone (the solver needs only torch).
    for args in ([torch_spec], ["--no-deps", str(wheel)]):
        cmd = [str(py), "-m", "pip", "install", "-q", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import torch, prefprune._C as C; from prefprune.cg import FactoredOperator, solve; "
        "d = torch.float64; op = FactoredOperator(torch.eye(3, dtype=d), 3 * torch.ones(3, dtype=d), 1.0); "
        "r = solve(op, torch.ones(3, 1, dtype=torch.float64), impl='native'); "
        "print(C.build_info(), r.status.tolist(), r.x.flatten().tolist())"
    )
    proc = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prefprune._C" in proc.stdout and "[0] [0.5, 0.5, 0.5]" in proc.stdout, proc.stdout
