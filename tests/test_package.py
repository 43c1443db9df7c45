"""The package face: a short public API, importable cheaply and lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_import_is_cheap_and_every_public_name_resolves():
    code = (
        "import sys, prefprune; "
        "heavy = [m for m in ('torch', 'tyro', 'pydantic', 'datasets', 'triton', 'prefprune._C') "
        "if m in sys.modules]; "
        "assert not heavy, heavy; "
        "missing = [n for n in prefprune.__all__ if getattr(prefprune, n, None) is None]; "
        "assert not missing, missing; "
        "import prefprune.influence as inf; "
        "assert all(getattr(inf, n) is not None for n in inf.__all__); "
        "print(len(prefprune.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 10 <= int(out.stdout) <= 25, f"__all__ should stay short, has {out.stdout.strip()} names"
