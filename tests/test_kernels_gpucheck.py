"""The GPU check of the segment kernels (bench/_gpu_triton.py) run on tiny shapes through the interpreter."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from prefprune.ops.segment import HAS_TRITON

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or (os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()),
    reason="needs Triton with a GPU or the interpreter",
)


def _load():
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))  # its sibling _gpu_common (bench/ is not a package)
    path = bench / "_gpu_triton.py"
    spec = importlib.util.spec_from_file_location("_gpu_triton", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_logic_small():
    mod = _load()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = mod.checks(device, small=True, timed=False)
    ops = {r["op"] for r in rows}
    assert ops == {"segment_grad_dot", "segment_project", "segment_grad_dot_grouped"}
    ran = [r for r in rows if not r.get("skipped")]
    assert {r["dtype"] for r in ran} >= {"fp32", "fp16"}
    for r in ran:
        assert r["ok"], f"{r['op']} {r['dtype']} {r['shape']}: {r['max_rel_err']:.3g} > tol {r['tol']:.3g}"
        assert r["bytes"] > 0 and r["flops"] > 0
    skipped = [r for r in rows if r.get("skipped")]
    assert all(r["dtype"] == "bf16" and "11584" in r["skipped"] for r in skipped) or device == "cuda"
    assert "FAIL" not in mod.format_table(rows)
    # counted work of a known case: X (10, 4), dY (10, 2), 3 segments, m = 2
    X, dY = torch.zeros(10, 4), torch.zeros(10, 2)
    offsets, Q = torch.tensor([0, 3, 3, 10]), torch.zeros(2, 2, 4)
    nbytes, flops = mod.count_dot(X, dY, offsets, Q)
    assert nbytes == (40 + 20 + 16) * 4 + 4 * 8 + 3 * 3 * 4
    assert flops == 2 * 10 * 4 * 2 + 2 * 3 * 3 * 4 * 2
