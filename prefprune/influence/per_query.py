"""Per-query influence: the n_train × n_val matrix, every validation pair its own query, and its file.

Every validation pair j is its own query b_j = ∇ℓ_j. The queries are solved as one multi-right-hand-side
system per tile of `tile` validation pairs (`prefprune.influence.solvers.solve`: direct, native multi-RHS
CG or multi-shift CG), and each tile's q_j go through one streaming pass over the training pairs whose fused
dots give ∇ℓ_iᵀ q_j for every (pair, query, damping value) at once, so memory is O(p · tile · L) whatever
n_val is. The matrix goes to its own safetensors file with the row and column ids
(``<output>.per_query.safetensors``, `prefprune.scorefile.per_query_path`), committed in one unit with the
score file and its sidecar (`prefprune.scorefile.write_scores`). Its mean over the columns is the
`influence` column (the query is linear).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prefprune.data import PairBatches
from prefprune.influence.curvature import Curvature
from prefprune.influence.plan import SolvePlan
from prefprune.influence.query import InfluenceQuery, refuse_nonfinite
from prefprune.influence.reducers import pair_gradient_rows, stream_pair_dots
from prefprune.influence.solvers import DirectFactors, solve
from prefprune.scorefile import per_query_path

__all__ = [
    "per_query_columns",
    "per_query_influence",
    "per_query_path",
]


def per_query_influence(
    curvature: Curvature,
    train_batches: PairBatches,
    val_batches: PairBatches,
    *,
    plan: SolvePlan,
    dampings: Sequence[float],
    relative: bool,
    tile: int,
    tol: float,
    max_iter: int,
    impl: str | None = None,
    inverse: DirectFactors | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Influence of every training pair on every validation pair, for every damping value.

    Args:
        curvature: H over the curvature sample.
        train_batches, val_batches: the pairs (rows in batch order: callers scatter back).
        tile: validation pairs solved and scored together (bounds memory at p × tile × L).
        inverse: the direct solve's factors (no further pass over the curvature sample).

    Returns:
        (n_train, n_val, L) float64 and the solve record (as a dict) of every tile.
    """
    if int(tile) < 1:
        raise ValueError(f"per-query tile must be >= 1, got {tile!r}")
    model, layout = curvature.model, curvature.layout
    rows = [r for _, r in pair_gradient_rows(model, layout, val_batches, objective=lambda m: F.softplus(-m),
                                             impl=impl)]
    Gv = torch.cat(rows)  # (n_val, p) per-pair validation gradients
    del rows
    n_val, L = Gv.shape[0], len(dampings)
    out = np.empty((train_batches.n_pairs, n_val, L), dtype=np.float64)
    records = []
    for j0 in range(0, n_val, int(tile)):
        B = Gv[j0 : j0 + int(tile)].T.to(layout.dtype).contiguous()  # (p, t)
        sol = solve(curvature, B, dampings, plan=plan, relative=relative, tol=tol, max_iter=max_iter,
                    impl=impl, factors=inverse)
        Q, rec = sol.Q, sol.record
        refuse_nonfinite(rec, plan.curvature)
        for i, c in enumerate(rec.columns):
            if c["status"] == "nonpositive_curvature":
                Q[i] = math.nan
        t = B.shape[1]
        # Damping-major columns: (l, j) at l·t + j; ∇ℓ_iᵀ Q by one streaming pass.
        queries = list(Q.permute(1, 0, 2).reshape(Q.shape[1], L * t).T)
        S = stream_pair_dots(model, layout, train_batches, queries, impl=impl, desc="per-query dots")[0]
        out[:, j0 : j0 + t, :] = S.reshape(-1, L, t).permute(0, 2, 1).numpy()
        records.append({"queries": [j0, j0 + t], **rec.to_dict()})
    return out, records


def per_query_columns(curvature: Curvature, query: InfluenceQuery, train_batches: PairBatches,
                      order: Sequence[int], *, val_enc: Sequence, val_batches: PairBatches,
                      row_ids: Sequence[str], plan: SolvePlan, config) -> tuple[dict, dict, float]:
    """The per-query matrix in training order × validation input order, its sidecar record and seconds.

    Args:
        train_batches: the training pairs in pass-2 order; order[k] = training index of its k-th pair.
        val_enc, val_batches: the validation pairs (input order) and their batches.
    """
    t0 = time.perf_counter()
    record = query.record
    M, records = per_query_influence(
        curvature, train_batches, val_batches, plan=plan, dampings=config.dampings(),
        relative=config.relative_damping, tile=config.per_query_tile, tol=config.tol,
        max_iter=config.max_iter, impl=config.impl, inverse=query.inverse,
    )
    rows = np.empty_like(M)
    rows[np.asarray(order)] = M  # back to training order
    pos = {id(e): j for j, e in enumerate(val_batches.encoded)}
    rows = rows[:, [pos[id(e)] for e in val_enc], :]  # columns in validation input order
    per_query = {
        "matrix": rows,
        "row_ids": list(row_ids),
        "col_ids": [e.id for e in val_enc],
        "column_names": list(record.column_names),
        "dampings": list(record.dampings),
    }
    meta = {"tiles": records, "tile": int(config.per_query_tile), "shape": list(rows.shape[:2]),
            "tensors": list(record.column_names)}
    return per_query, meta, time.perf_counter() - t0
