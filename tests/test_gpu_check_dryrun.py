"""`bench/gpu_check.py --dry-run` from a fresh copy of the tree, in an environment shaped like the GPU image.

The GPU machine gets the working tree (tracked and untracked-not-ignored files, links as links) and the
image's Python (`bench/gpu_image_packages.txt`): torch, triton, transformers, peft, safetensors, pyarrow,
pytest — but no `tyro`, `pydantic`, `datasets` and no prefprune installed. So that the check's install and
import path is exercised as it will run there, this test:
- copies those files (`git ls-files -co --exclude-standard`) to a temporary directory, plus the already
  built native extension (a build output the GPU run compiles itself; the dry run never compiles C++);
- runs the check in a child interpreter whose `sitecustomize` (on PYTHONPATH, so every grandchild —
  pip, the import probes, pytest — gets it too) removes this virtual environment's editable install of the
  original tree from the import system and makes every import of a distribution that the image lacks fail
  (`bench/gpu_image.py` says which, and why a few newer dependencies of the image's own packages stay);
- asserts that the check found prefprune not importable, installed the copy into a private prefix with
  `pip install -e` (offline, no build isolation, no dependencies), ran every section's CPU part and printed
  the table, and that nothing tried to import a hidden package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_SITECUSTOMIZE = r'''
import importlib.abc
import os
import sys

_HIDDEN = set(os.environ["PREFPRUNE_HIDDEN_MODULES"].split(","))


class _NotOnTheImage(importlib.abc.MetaPathFinder):
    """The GPU image lacks these packages: importing one fails (and is recorded)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _HIDDEN:
            # The importing file: optional imports inside other packages (torch tries `dill`) are theirs.
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
                frame = frame.f_back
            where = frame.f_code.co_filename if frame is not None else "?"
            with open(os.environ["PREFPRUNE_BLOCKED_LOG"], "a") as f:
                f.write(f"{name}\t{where}\n")
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on the GPU image)", name=name)
        return None


# Not installed there: drop the editable install of the original tree (its finder and path hook entry).
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.meta_path.insert(0, _NotOnTheImage())
'''


def _installed_prefprune() -> list[str]:
    """Where this environment has prefprune installed (its dist-info folders)."""
    dists = importlib.metadata.distributions()
    return sorted(str(d._path) for d in dists if d.metadata["Name"] == "prefprune")


def _tree_files() -> list[str]:
    cmd = ["git", "ls-files", "-co", "--exclude-standard", "-z"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and ((ROOT / p).is_file() or (ROOT / p).is_symlink())]


def _hidden_modules() -> list[str]:
    spec = importlib.util.spec_from_file_location("_gpu_image", ROOT / "bench" / "gpu_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.hidden_modules(mod.hidden_distributions())


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout"
)
def test_dry_run_from_a_fresh_copy_with_the_gpu_images_packages(tmp_path):
    hidden = _hidden_modules()
    assert {"tyro", "pydantic", "datasets"} <= set(hidden), hidden
    src = tmp_path / "src"
    for rel in _tree_files():
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest, follow_symlinks=False)
    built = list((ROOT / "prefprune").glob("_C*.so"))  # none in a fresh clone that was never built
    for so in built:
        shutil.copy2(so, src / "prefprune" / so.name)
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    blocked = tmp_path / "blocked.log"
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFPRUNE_", "PYTHON"))}
    env.update(PYTHONPATH=str(boot), PREFPRUNE_BLOCKED_LOG=str(blocked), TMPDIR=str(tmp_path),
               PREFPRUNE_HIDDEN_MODULES=",".join(hidden),
               HF_HUB_OFFLINE="1")
    env.pop("OUT", None)
    installed = _installed_prefprune()
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--json", str(report)], cwd=src,
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    # The check leaves the environment it runs in as it found it (pip would uninstall an existing prefprune
    # even when installing into another prefix, unless told --ignore-installed).
    assert _installed_prefprune() == installed and all(Path(p).exists() for p in installed)
    assert proc.returncode == 0, out[-6000:]
    data = json.loads(report.read_text())
    # prefprune was not importable (the original tree's install is hidden), so the check installed the copy.
    assert "not" in data["install"]["before"] or "No module" in data["install"]["before"], data["install"]
    assert data["install"]["how"].startswith("installed into"), data["install"]
    assert str(src) in data["install"]["after"]
    # Every section ran and produced rows; none failed.
    assert set(data["sections"]) == {"install", "pytest", "triton", "e2e", "cg"}
    by_section = {name: [r for r in data["rows"] if r.get("section") == name] for name in data["sections"]}
    assert all(by_section.values()), {k: len(v) for k, v in by_section.items()}
    assert not [r for r in data["rows"] if r.get("ok") is False]
    ran = {name: [r for r in rows if not r.get("skipped")] for name, rows in by_section.items()}
    if not built:  # without an extension the CG section can only say why it skipped
        assert [r["skipped"] for r in by_section["cg"]] == [by_section["cg"][0]["skipped"]]
        assert "native CG unavailable" in by_section["cg"][0]["skipped"]
        ran.pop("cg")
    else:
        assert any(r["op"].startswith("cg_callable m=1 large k") for r in ran["cg"])
    assert all(ran.values()), "a section only skipped"
    assert any(r["op"] == "segment_grad_dot_grouped" and r["ms_fast"] for r in ran["triton"])
    assert {r["dtype"] for r in ran["e2e"]} == {"fp32", "bf16"}
    assert "tests collected" in ran["pytest"][0]["note"]
    # The table came out, with the roofline and target columns.
    table = proc.stdout
    assert "prefprune GPU check (dry-run)" in table and " roof " in table and " target " in table
    # Nothing of this tree tried to import a hidden package (a lazy import that was tried is logged).
    tried = blocked.read_text().splitlines() if blocked.exists() else []
    ours = [line for line in tried if str(src) in line.split("\t")[1]]
    assert not ours, "\n".join(ours)
