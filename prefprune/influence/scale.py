"""The curvature's scale in every score run: trace(H)/p, the top eigenvalue, λ relative to them, and a warning
when the curvature has no effect at the chosen λ.

A damping λ means something only against the curvature's eigenvalues: with λ far above them (H + λI)⁻¹ ≈ I/λ,
and influence ranks pairs exactly as grad_dot does (DESIGN §2). So every run records, in the sidecar's
``curvature_scale`` block: the mean eigenvalue trace(H)/d of the curvature sample (exact from the solve's
factors or rows for the Gauss–Newton curvatures; for ``exact`` from d product columns when d is small, else a
seeded Hutchinson estimate with its probe count and standard error), the top eigenvalue where the direct solve
has it, each damping value relative to them, and each influence column's Spearman rank correlation with
grad_dot. `curvature_warnings` reads that block (from a `ScoreResult` or a sidecar read back) and is what the
scorer, `validate` and the experiment report call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from prefprune.influence.curvature import Curvature
from prefprune.influence.plan import CurvatureSolve

__all__ = [
    "EXACT_TRACE_MAX_DIM",
    "HUTCHINSON_PROBES",
    "RELATIVE_LIMIT",
    "SPEARMAN_LIMIT",
    "TOP_LIMIT",
    "curvature_scale",
    "curvature_warnings",
    "exact_hessian_trace",
    "scale_summary",
    "spearman_with_grad_dot",
]

#: Spearman(influence, grad_dot) at or above this: influence ranks as grad_dot does (the warning's rule).
SPEARMAN_LIMIT = 0.999
#: Without a Spearman value: λ at or above this many times the top eigenvalue (when known), else times
#: trace(H)/p. The mean alone is a weak sign for a low-rank curvature: on the demo's model trace(H)/p was
#: 1.3e-6 and the top eigenvalue 0.048, and λ = 0.01 (7.6e3 × the mean) still moved the ranking (Spearman
#: 0.89 with grad_dot).
TOP_LIMIT = 100.0
RELATIVE_LIMIT = 1e3
#: exact: the trace from d unit product columns up to this dimension, else Hutchinson. A product column of
#: the batched double backward costs about a CG iteration's, so unit columns pay only for the tiniest models;
#: Hutchinson's variance grows with H's off-diagonal mass (large for an indefinite Hessian away from an
#: optimum), so its standard error is recorded and printed.
EXACT_TRACE_MAX_DIM = 32
#: unit columns per pass of the exact trace (bounds the batched double backward's memory).
_COLUMN_BLOCK = 256
#: exact: Rademacher probes of a Hutchinson estimate when one is asked for (`ScoreConfig.trace_probes`).
HUTCHINSON_PROBES = 16

_SETTING = "--damping / score.damping"


def exact_hessian_trace(curvature: Curvature, *, seed: int = 0, probes: int = HUTCHINSON_PROBES,
                        max_dim: int | None = None) -> tuple[float, dict[str, Any]]:
    """trace(H) of an exact Hessian from products: exact (H's d unit columns, `_COLUMN_BLOCK` per pass) when
    d <= max_dim, else Hutchinson's mean of zᵀHz over `probes` seeded Rademacher vectors z (one pass).

    Returns:
        The trace and how it was estimated ({"method": "exact_columns", "passes"} or {"method": "hutchinson",
        "probes", "seed", "distribution", "trace_stderr"}: the standard error of the mean over the probes).
    """
    d = curvature.dim
    dtype, device = curvature.layout.dtype, curvature.layout.device
    max_dim = EXACT_TRACE_MAX_DIM if max_dim is None else max_dim
    if d <= max_dim:
        total, passes = 0.0, 0
        for start in range(0, d, _COLUMN_BLOCK):
            rows = torch.arange(start, min(d, start + _COLUMN_BLOCK), device=device)
            at = (rows, torch.arange(len(rows), device=device))
            Z = torch.zeros(d, len(rows), dtype=dtype, device=device)
            Z[at] = 1.0
            with curvature.context():
                total += float(curvature.matvec(Z)[at].double().sum())
            passes += 1
        return total, {"method": "exact_columns", "passes": passes}
    gen = torch.Generator().manual_seed(int(seed))
    Z = (torch.randint(0, 2, (d, probes), generator=gen) * 2 - 1).to(dtype=dtype, device=device)
    with curvature.context():
        per_probe = (Z.double() * curvature.matvec(Z).double()).sum(0)  # z_jᵀ H z_j
    stderr = float(per_probe.std()) / math.sqrt(probes) if probes > 1 else math.inf
    return float(per_probe.mean()), {"method": "hutchinson", "probes": int(probes), "seed": int(seed),
                                     "distribution": "rademacher", "trace_stderr": stderr}


def _mean_eigenvalue(curvature: Curvature, record: CurvatureSolve, *, seed: int,
                     probes: int = 0) -> tuple[float, dict]:
    """trace(H)/d of the curvature the solve used, and how it was obtained (at most one more pass).

    exact: with `probes` > 0 the exact Hessian's own trace (unit columns up to EXACT_TRACE_MAX_DIM, else
    Hutchinson with `probes` probes: one pass of that many products); with 0 its Gauss–Newton part's (the
    solve's factors under pcg, else one first-order pass), which is what relative damping multiplies and
    costs no Hessian–vector product."""
    d = max(1, curvature.dim)
    if curvature.name == "identity":
        return 1.0, {"method": "identity"}
    if curvature.name == "exact" and probes > 0:
        trace, how = exact_hessian_trace(curvature, seed=seed, probes=probes)
        return trace / d, how
    if curvature.name == "exact":
        scale = record.damping_scale if record.damping_scale is not None else curvature.trace() / d
        return float(scale), {"method": "gauss_newton_part",
                              "note": "trace(H_GN)/p of the exact Hessian's Gauss–Newton part (no Hessian–"
                                      "vector product); --trace-probes N estimates the exact Hessian's own"}
    if record.damping_scale is not None:
        return float(record.damping_scale), {"method": record.scale_source or "solve"}
    return curvature.trace() / d, {"method": "trace_pass"}


def spearman_with_grad_dot(columns: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """Spearman's rank correlation of every influence column (``influence``, ``influence@…``) with
    ``grad_dot`` over the pairs where both are finite (None: fewer than 3 such pairs, or a constant
    column)."""
    if "grad_dot" not in columns:
        return {}
    from scipy import stats  # imported on first use: importing prefprune stays cheap
    g = np.asarray(columns["grad_dot"], dtype=np.float64)
    out: dict[str, float | None] = {}
    for name, values in columns.items():
        if not (name == "influence" or name.startswith("influence@")):
            continue
        x = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(g)
        rho = math.nan
        if int(ok.sum()) >= 3:
            with warnings.catch_warnings():  # a constant column: NaN, reported as None
                warnings.simplefilter("ignore", stats.ConstantInputWarning)
                rho = float(stats.spearmanr(x[ok], g[ok])[0])
        out[name] = rho if math.isfinite(rho) else None
    return out


def _ratio(a: float, b: float | None) -> float | None:
    return a / b if b is not None and b > 0 else None


def curvature_scale(curvature: Curvature, record: CurvatureSolve, columns: Mapping[str, np.ndarray], *,
                    relative: bool, seed: int = 0, probes: int = 0) -> dict[str, Any]:
    """The sidecar's ``curvature_scale`` block of one score run.

    Args:
        curvature: the curvature the run solved with (an exact Hessian's trace may cost one more pass).
        record: the solve's record (its scale and top eigenvalue, when the solve had them).
        columns: the run's score columns (for Spearman with grad_dot).
        relative: whether the damping values were given relative to the Gauss–Newton trace/p.
        seed: the Hutchinson probes' seed (exact Hessians too large for their unit columns).
        probes: exact: Hutchinson probes of the exact Hessian's own trace (0: its Gauss–Newton part's).

    Returns:
        mean_eigenvalue, mean_eigenvalue_estimate (how), top_eigenvalue (None where the solve has none), dim,
        space, curvature, damping_rule, damping_scale (what relative damping multiplies) and its source,
        per damping column its λ, λ/mean_eigenvalue, λ/top_eigenvalue and Spearman with grad_dot, the
        Spearman of every influence column, and the warnings (`curvature_warnings`).
    """
    mean, how = _mean_eigenvalue(curvature, record, seed=seed, probes=probes)
    top = 1.0 if curvature.name == "identity" else record.top_eigenvalue
    rho = spearman_with_grad_dot(columns)
    block = {
        "curvature": curvature.name,
        "space": curvature.space,
        "dim": int(curvature.dim),
        "mean_eigenvalue": mean,
        "mean_eigenvalue_estimate": how,
        "top_eigenvalue": top,
        "damping_rule": "mean_eigenvalue" if relative else "absolute",
        "damping_scale": record.damping_scale,
        "damping_scale_source": record.scale_source,
        "dampings": [
            {"column": name, "damping": float(lam),
             "damping_factor": None if record.damping_factors is None else record.damping_factors[i],
             "relative_to_mean_eigenvalue": _ratio(float(lam), mean),
             "relative_to_top_eigenvalue": _ratio(float(lam), top),
             "spearman_with_grad_dot": rho.get(name)}
            for i, (name, lam) in enumerate(zip(record.column_names, record.dampings, strict=True))
        ],
        "spearman_with_grad_dot": rho,
    }
    block["warnings"] = curvature_warnings(block)
    return block


def curvature_warnings(block: Mapping[str, Any] | None) -> list[str]:
    """One message per damping value at which the curvature has no effect: Spearman(influence, grad_dot) >=
    `SPEARMAN_LIMIT`; where no Spearman value is known, λ >= `TOP_LIMIT` × the top eigenvalue (when known)
    or `RELATIVE_LIMIT` × trace(H)/p. Reads a ``curvature_scale`` block (a `ScoreResult`'s ``metadata``, or
    a sidecar read back); no block, or the identity curvature: none."""
    if not block or block.get("curvature") == "identity":
        return []
    mean, top = block.get("mean_eigenvalue"), block.get("top_eigenvalue")
    relative = block.get("damping_rule") == "mean_eigenvalue"
    out = []
    for d in block.get("dampings", []):
        rel, rel_top = d.get("relative_to_mean_eigenvalue"), d.get("relative_to_top_eigenvalue")
        rho = d.get("spearman_with_grad_dot")
        if rho is not None:
            flat = rho >= SPEARMAN_LIMIT
        else:
            flat = rel_top >= TOP_LIMIT if rel_top is not None else rel is not None and rel >= RELATIVE_LIMIT
        if not flat:
            continue
        scale = []
        if rel is not None:
            scale.append(f"{rel:.3g} × the curvature's mean eigenvalue trace(H)/p = {mean:.3g}")
        if rel_top is not None:
            scale.append(f"{rel_top:.3g} × its top eigenvalue {top:.3g}")
        given = (f"factor {d['damping_factor']:g} (--damping-relative / score.damping_relative), λ = "
                 f"{d['damping']:.3g}" if relative else f"{d['damping']:g}")
        out.append(
            f"curvature has no effect at damping {given} ({_SETTING}, curvature={block.get('curvature')!r}): "
            + (f"λ is {' and '.join(scale)}" if scale else "")
            + (f"; Spearman({d['column']}, grad_dot) = {rho:.4f}" if rho is not None else "")
            + f", so {d['column']} ranks pairs as grad_dot does. Give λ on the curvature's scale "
            "(--damping-relative, or leave --damping unset for 0.1 × trace(H)/p) and choose it with "
            "`prefprune validate`"
        )
    return out


def scale_summary(block: Mapping[str, Any] | None) -> list[str]:
    """Printable lines: the scale, λ relative to it per damping value, Spearman with grad_dot."""
    if not block:
        return []
    how = block.get("mean_eigenvalue_estimate", {})
    est = how.get("method", "?")
    if est == "gauss_newton_part":
        est = "of the exact Hessian's Gauss–Newton part; --trace-probes N estimates the exact Hessian's own"
    if est == "hutchinson":
        est += f", {how['probes']} probes, seed {how['seed']}, stderr of the trace {how['trace_stderr']:.2g}"
    top = block.get("top_eigenvalue")
    head = f"curvature scale ({block.get('curvature')}): trace(H)/p = {block['mean_eigenvalue']:.3g} ({est})"
    lines = [head + (f", top eigenvalue {top:.3g}" if top is not None else "")]
    for d in block.get("dampings", []):
        rel, rel_top, rho = (d.get(k) for k in ("relative_to_mean_eigenvalue", "relative_to_top_eigenvalue",
                                                "spearman_with_grad_dot"))
        lines.append(
            f"  {d['column']}: damping {d['damping']:.3g}"
            + (f" = {rel:.3g} × trace(H)/p" if rel is not None else "")
            + (f" = {rel_top:.3g} × top eigenvalue" if rel_top is not None else "")
            + (f"; Spearman with grad_dot {rho:.4f}" if rho is not None else "")
        )
    return lines
