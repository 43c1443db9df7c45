"""Build and install: setup.py's choice of CUDA, imports from the repository root, the library without the
CLI's libraries, and (opt-in, slow) a CPU wheel and a CUDA wheel, each in a fresh venv."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
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
    assert "prefprune/kernels/grad_dot.py" in names and "prefprune/kernels/_common.py" in names, names
    assert not any(n.startswith("kernels/") for n in names), names  # never a top-level `kernels` package
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


def _exec_setup(monkeypatch) -> dict:
    """setup.py's namespace, with setuptools.setup a no-op (nothing is built)."""
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "setup", "__file__": str(ROOT / "setup.py")}
    exec(compile((ROOT / "setup.py").read_text(), str(ROOT / "setup.py"), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("force", ["0", "1"])
def test_cuda_build_is_chosen_from_torch_and_toolkit_never_from_a_visible_gpu(monkeypatch, force):
    """A CUDA torch and a toolkit choose the CUDA build on a host with no GPU; the GPU is never asked."""
    import torch.utils.cpp_extension as cpp

    namespace = _exec_setup(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp, "CUDA_HOME", "/usr/local/cuda")

    def probed(*a, **k):
        raise AssertionError("setup.py probed for a GPU")

    monkeypatch.setattr(torch.cuda, "is_available", probed)
    monkeypatch.setattr(torch.cuda, "device_count", probed)
    monkeypatch.setenv("PREFPRUNE_FORCE_CUDA", force)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert namespace["_want_cuda"]() is True
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == namespace["DEFAULT_CUDA_ARCHS"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert namespace["_want_cuda"]() is True
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"  # the user's list is kept


def test_cuda_torch_without_toolkit_builds_cpu_and_says_why_or_fails_when_forced(monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp

    namespace = _exec_setup(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp, "CUDA_HOME", None)
    monkeypatch.setenv("PREFPRUNE_FORCE_CUDA", "0")
    assert namespace["_want_cuda"]() is False
    assert "CPU-only extension: no CUDA toolkit was found" in capsys.readouterr().err
    monkeypatch.setenv("PREFPRUNE_FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="PREFPRUNE_FORCE_CUDA=1 but no CUDA toolkit was found"):
        namespace["_want_cuda"]()


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter started in the repository root, the root first on sys.path (as
    `python -m pytest`, `python -m prefprune` and `torchrun -m` have it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_repository_root_first_on_sys_path_does_not_shadow_hugging_faces_kernels():
    """transformers >= 5.25 imports Hugging Face's `kernels`; the top-level kernels/ folder must not win."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25 does not need it)")
    code = textwrap.dedent(
        """
        import transformers.integrations.hub_kernels, kernels
        import peft
        print(kernels.__file__)
        """
    )
    proc = _run_from_root(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    assert where.parent != (ROOT / "kernels").resolve(), f"`kernels` imported from this tree: {where}"
    assert "site-packages" in where.parts, where


def test_prefprune_kernels_is_the_top_level_folder():
    pytest.importorskip("triton")
    proc = _run_from_root("import prefprune.kernels.grad_dot as g, prefprune.kernels.project as p; "
                          "print(g.__file__); print(p.__file__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.strip().splitlines()[-2:]:
        assert Path(line).resolve().parent == ROOT / "kernels", line


def test_python_m_prefprune_from_the_repository_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "prefprune", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"prefprune {importlib.metadata.version('prefprune')}"


_NO_CLI_LIBRARIES = textwrap.dedent(
    """
    import importlib.abc, sys
    HIDDEN = {"tyro", "pydantic", "pydantic_core", "datasets"}

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)

    sys.meta_path.insert(0, Hide())
    import prefprune, prefprune.score, prefprune.train, prefprune.prune, prefprune.validate
    import prefprune.experiment, prefprune.ops.segment, prefprune.ops.reference, prefprune.data
    print(sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN))
    """
)


def test_the_library_imports_without_the_clis_libraries():
    """tyro (CLI), pydantic (settings from YAML/mappings) and datasets (hub sources) are not on the import
    path of the library: the GPU image has none of them."""
    proc = _run_from_root(_NO_CLI_LIBRARIES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_cli_options_still_reach_tyro():
    """The library's `cli_arg` markers become tyro's once the CLI has imported it (aliases, flattening)."""
    proc = subprocess.run([sys.executable, "-m", "prefprune", "train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--data STR, --source STR" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "prefprune", "experiment", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--model " in proc.stdout and "--model.model" not in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PREFPRUNE_TEST_CUDA_WHEEL") != "1",
    reason="opt-in (downloads a CUDA torch, ~3 GB, and compiles with nvcc): set PREFPRUNE_TEST_CUDA_WHEEL=1",
)
def test_cuda_wheel_built_on_a_gpu_less_host(tmp_path):
    """`make cuda-wheel`: a CUDA build of torch in its own venv + nvcc → a wheel with sm_90 CG kernels,
    installed into a fresh venv and imported (bench/check_cuda_wheel.py checks it; this reads its report)."""
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("needs the CUDA toolkit (nvcc)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFPRUNE_")}
    proc = subprocess.run(["make", "cuda-wheel"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "fresh venv import: prefprune._C: CPU + CUDA" in out, out[-5000:]
    assert "arch = sm_90" in out or "sm_90" in out.split("wheel:", 1)[1], out[-5000:]
    assert "CG kernel functions in the sm_90 code: 0" not in out, out[-5000:]
