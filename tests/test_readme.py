"""Every command block of README.md runs (issue 23): each ```bash and ```python block is extracted by its
fences and run in a temporary folder with the same Python, on tiny data and a tiny model; a block that
installs software or needs GPUs is left out by name in `NOT_RUN`, with the reason.

Substitutions (so that the blocks run in seconds on a CPU, offline):

- ``prefprune CMD ...`` runs as ``python -m prefprune CMD ...`` (this interpreter, this checkout);
- the data files a block reads (`DATA_FILES`) are written first: small, easily learnable pairs;
- ``prefprune train`` gets ``--model tiny:bert`` (the MiniLM backbone's family, randomly initialised and
  tiny) and short settings (`EXTRA_FLAGS`), appended so that they win over the block's own values;
- in Python blocks, `PYTHON_SUBSTITUTIONS` shrink the data and the epochs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from _pairs import easy_pairs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

#: Blocks left out: a phrase the block holds → why it is not run here.
NOT_RUN = {
    "python -m venv .venv": "creates a virtual environment and pip-installs torch and the package",
    "PREFPRUNE_FORCE_CUDA=1": "pip-installs a CUDA build of torch and compiles the CUDA kernels (nvcc)",
    "make cuda-wheel": "builds a CUDA wheel in its own virtual environment (nvcc, a CUDA torch), installs it",
    "torchrun": "spreads scoring over several GPUs",
}
#: Data files a command block may read, written before it runs: name → number of pairs.
DATA_FILES = {"train.jsonl": 40, "val.jsonl": 12, "test.jsonl": 12, "data/train.jsonl": 40,
              "data/val.jsonl": 12}
#: Flags appended to a command (they override the block's): the tiny model and short settings.
EXTRA_FLAGS = {
    # Trained enough for a curvature on a usual scale: after one epoch at the default rate a tiny model's
    # trace(H)/p is ~4e-10, and score refuses damping 1 as lost below float32 rounding.
    "train": ["--model", "tiny:bert", "--epochs", "3", "--lr", "1e-2", "--max-length", "64", "--batch-size",
              "8", "--no-progress"],
    "score": ["--no-progress"],
    "validate": ["--subsets", "5", "--no-progress", "--bootstrap-samples", "200"],
}
#: Python blocks: (pattern, replacement) applied where they match, to shrink the run.
PYTHON_SUBSTITUTIONS = [(r"make_synthetic\(\d+", "make_synthetic(40"), (r"epochs=\d+", "epochs=1")]


def readme_blocks() -> list[tuple[str, str, int]]:
    """(language, code, line of the opening fence) of every fenced block of README.md."""
    text = README.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def _commands(code: str) -> list[list[str]]:
    """The shell commands of a block, split into words (continuations joined, comments dropped)."""
    joined = code.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def how_to_run(lang: str, code: str) -> str:
    """'python', 'cli', or 'skip: <reason>'; raises for a block that is neither runnable nor listed."""
    listed = [why for phrase, why in NOT_RUN.items() if phrase in code]
    if listed:
        return "skip: " + listed[0]
    if lang == "python":
        return "python"
    if lang == "bash" and all(words[0] == "prefprune" for words in _commands(code)):
        return "cli"
    raise AssertionError(
        f"README.md has a ```{lang} block that this test neither runs nor lists in NOT_RUN:\n{code}\n"
        "Make it runnable here (prefprune commands, Python) or add it to NOT_RUN with the reason"
    )


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _run(args: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{what} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"


def _write_data(code: str, folder: Path) -> None:
    for k, (name, n) in enumerate(DATA_FILES.items()):
        if re.search(rf"(?<![\w/.]){re.escape(name)}\b", code):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            easy_pairs(n, seed=k, prefix=f"d{k}-").save(folder / name)


def run_cli_block(code: str, folder: Path) -> None:
    _write_data(code, folder)
    for words in _commands(code):
        extra = EXTRA_FLAGS.get(words[1], [])
        _run([sys.executable, "-m", "prefprune", *words[1:], *extra], folder, " ".join(words))
        if "--output" in words:  # and it wrote what it names (a score file, a model or report folder)
            written = folder / words[words.index("--output") + 1]
            assert written.exists(), f"{' '.join(words)}: exit 0 but no {written.name}"


def run_python_block(code: str, folder: Path) -> None:
    for pattern, replacement in PYTHON_SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    (folder / "block.py").write_text(code)
    _run([sys.executable, "block.py"], folder, "the Python block")


def test_every_readme_block_is_run_or_listed():
    """Pins: a new command block in the README is either run by `test_readme_block` or named in NOT_RUN
    with its reason; and the quickstarts (one CLI, one Python block) are among the blocks run."""
    kinds = [how_to_run(lang, code) for lang, code, _ in readme_blocks()]
    assert "cli" in kinds and "python" in kinds, kinds


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(readme_blocks())), ids=lambda i: f"block{i}")
def test_readme_block(index, tmp_path):
    """Each runnable README block runs to the end (exit code 0) with the substitutions above."""
    lang, code, line = readme_blocks()[index]
    kind = how_to_run(lang, code)
    if kind.startswith("skip"):
        pytest.skip(f"README.md line {line}: {kind[len('skip: '):]}")
    if kind == "cli":
        run_cli_block(code, tmp_path)
    else:
        run_python_block(code, tmp_path)
