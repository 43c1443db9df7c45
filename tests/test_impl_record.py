"""The sidecar's implementation record equals what ran: each CG implementation forced, spied, read back."""

from __future__ import annotations

import json

import pytest
import torch
from _scoring_helpers import make_pairs, tiny_model, tokenizer

from prefprune import _ext, cg
from prefprune.score import ScoreConfig, score_pairs

TRAIN = make_pairs(5, seed=1)
VAL = make_pairs(2, seed=2, prefix="v")


@pytest.mark.parametrize("curvature,solver", [("projected_ggn", "cg"), ("ggn", "cg"), ("exact", "cg"),
                                               ("exact", "pcg")])
@pytest.mark.parametrize("impl", ["reference", "native", "triton"])
def test_sidecar_names_the_cg_implementation_that_ran(tmp_path, monkeypatch, curvature, solver, impl):
    """PREFPRUNE_IMPL=triton has no CG fast path, so the reference runs and the sidecar must say so."""
    if impl == "native" and _ext.native() is None:
        pytest.skip(_ext.native_error())
    ran: list[str] = []
    for name in ("_reference", "_native"):
        real = getattr(cg, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            ran.append(_name.lstrip("_"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cg, name, spy)
    monkeypatch.setenv("PREFPRUNE_IMPL", impl)
    model = tiny_model("gpt_neox", dtype=torch.float32)
    cfg = ScoreConfig(curvature=curvature, solver=solver, damping=5.0, projection_k=3, batch_size=3, tol=1e-8,
                      max_iter=200, progress=False)
    out = tmp_path / "scores.csv"
    score_pairs(model, tokenizer(), TRAIN, VAL, config=cfg).save(out)
    sidecar = json.loads((tmp_path / "scores.csv.json").read_text())
    assert ran and set(ran) == {sidecar["impl"]["cg"]}, f"ran {ran}, sidecar impl {sidecar['impl']}"
    assert sidecar["solve"]["impl"] == sidecar["impl"]["cg"], sidecar["solve"]
    assert sidecar["impl"]["cg"] == ("native" if impl == "native" else "reference")
