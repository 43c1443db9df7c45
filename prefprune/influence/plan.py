"""How the curvature system will be solved, chosen and checked before any pass over the data.

`plan_solve` chooses how Q_l = (H + λ_l I)⁻¹ B is obtained for a block B of m query vectors and L damping
values, and checks the damping list and the memory budget:

- ``direct`` (``ggn``, ``projected_ggn``): the curvature sample's margin-gradient rows (projected for
  ``projected_ggn``) from **one** pass, one eigendecomposition of the n_h×n_h Gram (Woodbury) or of the
  d×d matrix when d < n_h (`prefprune.influence.eigen`); every damping value and query from the same factors.
- ``pcg`` (``exact`` when the Gauss–Newton factors of the curvature sample fit the budget): one pass for
  the Gauss–Newton rows and their eigendecomposition (the direct solve's), whose inverse (H_GN + λI)⁻¹
  preconditions CG on the exact Hessian; every damping value is a column of one batched HVP pass per
  iteration (`prefprune.ops.woodbury`: preconditioning breaks the shared Krylov space multi-shift needs).
- ``multishift`` (``exact`` over the budget, or ``ggn`` when its rows do not fit the budget, with several
  damping values): one Krylov space for all shifts, one pass per iteration (`prefprune.influence.multishift`).
- ``cg``: the native multi-RHS CG (`prefprune.cg.solve`), one column per (query, damping value).
- ``none`` (``identity``): Q = B.

`CurvatureSolve` is the record of a solve (the sidecar's): the plan, every damping value in both forms, the
passes over the curvature sample, the implementation that ran and the status of each damping column.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

__all__ = [
    "SOLVERS",
    "CurvatureSolve",
    "SolvePlan",
    "Solver",
    "check_dampings",
    "damping_column_names",
    "plan_solve",
]

#: How the curvature system is solved; "auto" picks per curvature and memory budget.
Solver = Literal["auto", "direct", "cg", "multishift", "pcg"]
SOLVERS: tuple[str, ...] = typing.get_args(Solver)

_MIB = 1 << 20


def damping_column_names(
    dampings: Sequence[float], *, relative: bool, prefix: str = "influence"
) -> list[str]:
    """Column name per damping value: ``prefix`` alone for one value, else ``prefix@<value>`` (``@r<factor>``
    for relative damping).

    The value is written as Python's shortest round-trip repr, so distinct values give distinct names.
    """
    if len(dampings) == 1:
        return [prefix]
    tag = "@r" if relative else "@"
    return [f"{prefix}{tag}{float(x)!r}" for x in dampings]


@dataclass(frozen=True)
class SolvePlan:
    """How the solve will run (chosen before any pass).

    Attributes:
        curvature: "exact", "ggn", "projected_ggn" or "identity".
        method: "direct", "pcg", "cg", "multishift" or "none".
        form: direct and pcg (the preconditioner's factors): "gram" (n_h×n_h Woodbury) or "primal" (d×d).
        space: "weights" (dimension p) or "projected" (dimension = the projection's).
        dim: dimension d of the solved system.
        n_curvature: pairs in the curvature sample.
        bytes_needed: memory the direct factors take (pcg: the preconditioner's; 0 for cg, multishift).
        budget_bytes: the memory budget.
        reason: why this method.
    """

    curvature: str
    method: str
    form: str | None
    space: str
    dim: int
    n_curvature: int
    bytes_needed: int
    budget_bytes: int
    reason: str


def _direct_bytes(n: int, d: int, itemsize: int) -> dict[str, int]:
    # gram: rows U and W (same dtype) + the float64 Gram, its eigenvectors and eigh's workspace;
    # primal: the float64 d×d matrix, its eigenvectors and workspace.
    return {"gram": 2 * n * d * itemsize + 3 * n * n * 8, "primal": 3 * d * d * 8}


def check_dampings(dampings: Sequence[float], *, curvature: str, relative: bool) -> list[float]:
    """The damping values as floats, checked: numbers, finite, >= 0 (> 0 for exact), distinct, not empty."""
    what = "damping factor" if relative else "damping"
    if isinstance(dampings, int | float):
        dampings = [dampings]
    vals = []
    for x in dampings:
        try:
            v = float(x)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a number or a list of numbers, got {x!r}") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{what} must be finite and >= 0, got {x!r}")
        if curvature == "exact" and v <= 0:
            raise ValueError(
                f"{what} must be > 0 with curvature='exact' (an exact Hessian can be singular or "
                f"indefinite), got {x!r} in {list(dampings)!r}"
            )
        vals.append(v)
    if not vals:
        raise ValueError(f"the {what} list is empty; give at least one value")
    seen: set[float] = set()
    dup = [v for v in vals if v in seen or seen.add(v)]
    if dup:
        raise ValueError(
            f"duplicate {what} values {sorted(set(dup))} in {list(dampings)!r}; each value gives one column"
        )
    return vals


def plan_solve(
    *,
    curvature: str,
    n_params: int,
    n_curvature: int,
    dampings: Sequence[float],
    relative: bool = False,
    solver: str = "auto",
    memory_budget_mb: float = 2048.0,
    itemsize: int = 4,
    projection_dim: int | None = None,
) -> SolvePlan:
    """Choose the solve method and check the settings (raises ValueError before any pass).

    Args:
        n_params: p, trainable parameters.
        n_curvature: n_h, pairs in the curvature sample.
        dampings: damping values (absolute, or factors of the mean eigenvalue when `relative`).
        solver: "auto", "direct", "pcg", "cg" or "multishift".
        memory_budget_mb: memory the direct factors (pcg: the preconditioner's) may take (MiB).
        itemsize: bytes per element of the gradient rows (4 for fp32/fp16/bf16 models, 8 for fp64).
        projection_dim: projected_ggn: dimension of the projected space.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not (math.isfinite(memory_budget_mb) and memory_budget_mb > 0):
        raise ValueError(f"memory_budget_mb must be finite and > 0, got {memory_budget_mb!r}")
    vals = check_dampings(dampings, curvature=curvature, relative=relative)
    budget = int(memory_budget_mb * _MIB)
    if curvature == "identity":
        return SolvePlan(curvature, "none", None, "weights", n_params, 0, 0, budget, "identity: q = b")
    if n_curvature < 1:
        raise ValueError(f"curvature={curvature!r} needs a non-empty curvature set")
    space = "projected" if curvature == "projected_ggn" else "weights"
    d = int(projection_dim) if curvature == "projected_ggn" else int(n_params)
    iterative = "multishift" if len(vals) > 1 else "cg"
    need = _direct_bytes(n_curvature, d, itemsize)
    form = "gram" if n_curvature <= d else "primal"
    if need[form] > budget and need["gram" if form == "primal" else "primal"] <= budget:
        form = "gram" if form == "primal" else "primal"
    fits = need[form] <= budget
    mib = need[form] / _MIB
    if curvature == "exact":
        return _plan_exact(solver, iterative, form, fits, need[form], d, n_curvature, budget,
                           memory_budget_mb)
    if solver == "pcg":
        raise ValueError(f"solver='pcg' preconditions the exact Hessian with the Gauss–Newton inverse; with "
                         f"curvature={curvature!r} that inverse is the solution: use 'direct' or 'auto'")
    if form == "gram" and 0.0 in vals and fits:
        raise ValueError(
            f"damping 0 with a direct {curvature} solve: the Gauss–Newton matrix of {n_curvature} pairs has "
            f"rank <= {n_curvature} < {d} dimensions, so H is singular; use a damping > 0"
        )
    if solver == "auto":
        if fits:
            return SolvePlan(curvature, "direct", form, space, d, n_curvature, need[form], budget,
                             f"{form} factors ({mib:.1f} MiB) fit the {memory_budget_mb:g} MiB budget")
        if curvature == "projected_ggn":
            raise ValueError(
                f"memory_budget_mb={memory_budget_mb:g} is too small even for the projected Gram: "
                f"{n_curvature} rows of {d} projected dimensions need {need['gram'] / _MIB:.1f} MiB (gram) "
                f"or "
                f"{need['primal'] / _MIB:.1f} MiB (primal); raise memory_budget_mb, lower projection_k or "
                "hessian_samples"
            )
        return SolvePlan(curvature, iterative, None, space, d, n_curvature, 0, budget,
                         f"the direct factors ({mib:.1f} MiB) exceed the {memory_budget_mb:g} MiB budget; "
                         "Gauss–Newton products by CG, one pass per iteration")
    if solver == "direct":
        if not fits:
            raise ValueError(
                f"solver='direct' needs {mib:.1f} MiB for the {form} factors of {n_curvature} rows x {d} "
                f"dimensions, over memory_budget_mb={memory_budget_mb:g}; raise it or use solver='auto'"
            )
        return SolvePlan(curvature, "direct", form, space, d, n_curvature, need[form], budget, "requested")
    return SolvePlan(curvature, solver, None, space, d, n_curvature, 0, budget, "requested")


def _plan_exact(solver: str, iterative: str, form: str, fits: bool, need: int, d: int, n_curvature: int,
                budget: int, memory_budget_mb: float) -> SolvePlan:
    """exact: Gauss–Newton-preconditioned CG when its factors fit the budget, else plain CG (multi-shift)."""
    mib = need / _MIB
    if solver == "direct":
        raise ValueError("solver='direct' needs a Gauss–Newton curvature (ggn, projected_ggn); "
                         "exact uses 'pcg', 'cg' or 'multishift'")
    if solver == "pcg" and not fits:
        raise ValueError(
            f"solver='pcg' needs {mib:.1f} MiB for the Gauss–Newton preconditioner's {form} factors of "
            f"{n_curvature} rows x {d} dimensions, over memory_budget_mb={memory_budget_mb:g}; raise it, "
            "lower hessian_samples or use solver='cg'"
        )
    if solver == "pcg" or (solver == "auto" and fits):
        why = ("requested" if solver == "pcg" else
               f"the Gauss–Newton {form} factors ({mib:.1f} MiB) fit the {memory_budget_mb:g} MiB budget: "
               "CG on the exact Hessian preconditioned by (H_GN + λI)⁻¹, every damping value a column")
        return SolvePlan("exact", "pcg", form, "weights", d, n_curvature, need, budget, why)
    method = iterative if solver == "auto" else solver
    if solver != "auto":
        why = "requested"
    else:
        why = (f"the Gauss–Newton {form} factors ({mib:.1f} MiB) exceed the {memory_budget_mb:g} MiB budget: "
               "no preconditioner; exact Hessian " + ("by multi-shift CG, one Krylov space for all shifts"
                                                       if method == "multishift" else "by CG"))
    return SolvePlan("exact", method, None, "weights", d, n_curvature, 0, budget, why)


@dataclass
class CurvatureSolve:
    """The record of one solve (it goes into the sidecar).

    Attributes:
        plan: the `SolvePlan` as a dict.
        dampings: absolute λ per column.
        damping_factors: the factors given when damping is relative (None otherwise).
        damping_scale: trace(H)/d used by relative damping (None when not computed).
        column_names: influence column per damping value.
        columns: per damping value: status (worst over the queries), iterations, residual,
            nonpositive_value, nonpositive_iteration, nonpositive_queries, and passes (the passes over the
            curvature sample this damping value needed: setup passes — Gauss–Newton rows, trace — plus
            one per iteration that takes a pass).
        curvature_passes: forward+backward passes over the curvature sample (all damping values together:
            a batched product serves every column in one pass).
        n_queries: right-hand sides solved per damping value.
        impl: the iterative solver's implementation ("native", "reference", "multishift", "eigh", "none").
        seconds: wall time.
        projection_dim: projected_ggn: dimension of the projected space.
        preconditioner: "gauss_newton_woodbury" (pcg) or None.
        top_eigenvalue: the largest eigenvalue of H where the solve has it (direct: the eigendecomposition),
            else None.
        scale_source: where `damping_scale` came from ("eigendecomposition", "gauss_newton_factors" (pcg:
            the Gauss–Newton part of an exact Hessian), "factor_rows" or "trace_pass"); None without one.
        extra: the curvature's own settings (`Curvature.settings`: exact's ``hvp_batch_size``).
    """

    plan: dict
    dampings: list[float]
    damping_factors: list[float] | None
    damping_scale: float | None
    column_names: list[str]
    columns: list[dict]
    curvature_passes: int
    n_queries: int
    impl: str
    seconds: float
    projection_dim: int | None = None
    extra: dict = field(default_factory=dict)
    preconditioner: str | None = None
    top_eigenvalue: float | None = None
    scale_source: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def plan_for_config(config, layout, *, n_curvature: int) -> SolvePlan:
    """The `SolvePlan` of a `prefprune.score.ScoreConfig` over a `ParameterLayout`; ValueError on bad
    settings, before any pass."""
    return plan_solve(
        curvature=config.curvature,
        n_params=layout.numel,
        n_curvature=n_curvature,
        dampings=config.dampings(),
        relative=config.relative_damping,
        solver=config.solver,
        memory_budget_mb=float(config.memory_budget_mb),
        itemsize=8 if layout.dtype == torch.float64 else 4,
        projection_dim=layout.projection_dim(config.projection_k),
    )
