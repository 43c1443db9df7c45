"""The influence engine, one concept per module (DESIGN §6):

- `layout`: the trainable parameters as one flat vector (flatten, split, gradients, projections);
- `capture`: one streaming capture of every trainable linear's (X, Δ), one layer deep; `reducers`: what is
  made of it (dots and squared norms, per-pair gradient rows); `oracle`: the single-pair-loop test oracle;
- `curvature`: the `Curvature` interface (matvec, rows, trace) — exact Hessian, Gauss–Newton, projected
  Gauss–Newton, identity;
- `plan` (how a solve will run, checked before any pass) and `solvers`: solve(curvature, B, dampings) by the
  direct Woodbury/primal eigendecomposition (`eigen`), CG (`prefprune.cg`) or multi-shift CG (`multishift`);
- `query`: the `InfluenceQuery` (∇L_V, the solved queries per damping value, the inverse), saved for resume;
- `scores` and `per_query`: the score columns from a query; `scorer`: the `InfluenceScorer`
  (pass 1 → solve → pass 2); `settings`: `ScoreConfig` and `ScoreResult`.

Names are imported lazily: importing the package loads nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Curvature": "curvature",
    "InfluenceQuery": "query",
    "InfluenceScorer": "scorer",
    "NonPositiveCurvatureError": "query",
    "ParameterLayout": "layout",
    "ScoreConfig": "settings",
    "ScoreResult": "settings",
    "SolveInfo": "query",
    "StreamingCapture": "capture",
    "make_curvature": "curvature",
    "solve": "solvers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prefprune.influence' has no attribute {name!r}")
    return getattr(importlib.import_module(f"prefprune.influence.{_EXPORTS[name]}"), name)
