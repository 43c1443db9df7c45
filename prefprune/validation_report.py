"""What `prefprune validate` measured and how sure it is: the metrics, the recommendation, the summary text
and the scatter plot of validate.json's results."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefprune._io import atomic_write
from prefprune.bootstrap import correlation_interval, pearson, spearman
from prefprune.influence.scale import curvature_warnings

logger = logging.getLogger(__name__)

__all__ = ["MEASURES", "SCATTER_PLOT", "lds_metrics", "recommend", "validation_summary", "write_scatter"]

SCATTER_PLOT = "validate_scatter.png"

#: What each number of validate.json predicts (written into it and paraphrased in the summary).
MEASURES = {
    "lds": "linear datamodeling score: Spearman rank agreement between the predicted and the measured change "
    "of validation loss when the model is retrained on random subsets keeping a fraction α of the "
    "training pairs (α = 0.5: halving)",
    "loo": "leave-one-out: Pearson (and Spearman) correlation of the predicted and the measured change of "
    "validation loss when single pairs are removed and the model retrained",
    "pruning": "pruning check: change of test accuracy from removing each column's lowest k% of the training "
    "pairs and retraining, against removing k% at random (paired bootstrap over random draws and test pairs)",
    "caveat": "a good LDS or leave-one-out correlation does not imply a pruning gain: both predict changes "
    "of validation loss, not the test accuracy after removing the lowest-scored pairs (the pruning check "
    "measures that)",
}


def lds_metrics(
    cols: Mapping[str, np.ndarray],
    ids: Sequence[str],
    l_full: float,
    subsets: Sequence[Mapping],
    loo: Sequence[Mapping],
    *,
    n_boot: int,
    level: float,
    seed: int,
) -> dict[str, Any]:
    """Each column's LDS over the subsets (and leave-one-out correlations with >= 3 single removals)."""
    n, pos = len(ids), {i: k for k, i in enumerate(ids)}
    actual = np.asarray([s["val_loss"] - l_full for s in subsets])
    interval = functools.partial(correlation_interval, n_boot=n_boot, level=level, seed=seed)
    out: dict[str, Any] = {}
    for name, values in cols.items():
        if not np.all(np.isfinite(values)):
            out[name] = {"note": "non-finite scores (H + λI not positive definite for this damping)"}
            continue
        pred = np.asarray([values[[pos[i] for i in s["left_out"]]].sum() / n for s in subsets])
        entry: dict[str, Any] = {
            "lds": interval(pred, actual, method="spearman").to_dict(),
            "subset_predicted": pred.tolist(),
        }
        if len(loo) >= 3:
            lp = np.asarray([values[pos[r["id"]]] / n for r in loo])
            la = np.asarray([r["val_loss"] - l_full for r in loo])
            entry["loo"] = {
                "pearson": pearson(lp, la),
                "spearman": spearman(lp, la),
                "pearson_interval": interval(lp, la, method="pearson").to_dict(),
                "predicted": lp.tolist(),
            }
        out[name] = entry
    return out


def _damping_of(column: str) -> float:
    """The damping value of an ``influence@<λ>`` (or ``influence@r<factor>``) column name."""
    return float(column.split("@", 1)[1].lstrip("r"))


def _ranked(values: Mapping[str, Mapping[str, Any]], by: str) -> dict[str, Any] | None:
    """The best of `values` (column → interval dict) and whether its interval lies above the runner-up's."""
    finite = {k: v for k, v in values.items() if math.isfinite(v["value"])}
    if not finite:
        return None
    order = sorted(finite, key=lambda k: finite[k]["value"], reverse=True)
    best = finite[order[0]]
    rec: dict[str, Any] = {"damping": _damping_of(order[0]), "column": order[0], "by": by, "value": best}
    if len(order) > 1:
        second = finite[order[1]]
        # best >= second, so the two intervals are disjoint only when best's low end is above second's high
        # end (a NaN bound counts as overlapping: nothing is claimed).
        rec["runner_up"] = {"damping": _damping_of(order[1]), "column": order[1], "value": second}
        rec["distinguishable_from_runner_up"] = bool(best["low"] > second["high"])
    return rec


def recommend(metrics: Mapping[str, Any], prune: Mapping[str, Any] | None) -> dict[str, Any]:
    """The damping recommended by the LDS and, when the pruning check ran, by it; `recommended` rests on the
    pruning check when there is one (it measures what a pruning user needs), else on the LDS."""
    infl = {k: v for k, v in metrics.items() if k.startswith("influence@") and "lds" in v}
    by_lds = _ranked({k: v["lds"] for k, v in infl.items()}, "lds")
    with_loo = {k: v for k, v in infl.items() if "loo" in v and math.isfinite(v["loo"]["pearson"])}
    if by_lds is not None and with_loo:
        by_lds["damping_by_loo"] = _damping_of(max(with_loo, key=lambda k: with_loo[k]["loo"]["pearson"]))
    by_prune = None
    if prune is not None:
        cols = {k: v["delta_vs_random"] for k, v in prune["columns"].items() if k.startswith("influence@")}
        by_prune = _ranked(cols, "pruning check")
    return {"recommended": by_prune or by_lds, "by_lds": by_lds, "by_pruning_check": by_prune}


def write_scatter(results: Mapping[str, Any], folder: Path) -> str | None:
    """Predicted against measured change of validation loss, one panel per column; None without matplotlib."""
    try:
        import matplotlib  # optional dependency (prefprune[plots]): imported only to plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no scatter plot (pip install 'prefprune[plots]')")
        return None
    names = [k for k, v in results["columns"].items() if "lds" in v]
    actual = [s["val_loss"] - results["reference"]["val_loss"] for s in results["subsets"]]
    loo_actual = [r["val_loss"] - results["reference"]["val_loss"] for r in results["loo"]]
    rows = 2 if results["loo"] and len(results["loo"]) >= 3 else 1
    fig, axes = plt.subplots(rows, len(names), figsize=(3.6 * len(names), 3.3 * rows), squeeze=False)
    for j, name in enumerate(names):
        m = results["columns"][name]
        ax = axes[0][j]
        ax.scatter(m["subset_predicted"], actual, s=14)
        ax.set_title(
            f"{name}\nLDS {m['lds']['value']:.2f} [{m['lds']['low']:.2f}, {m['lds']['high']:.2f}]", fontsize=8
        )
        ax.set_xlabel("predicted Δ val loss", fontsize=7)
        ax.set_ylabel("measured Δ (subsets)", fontsize=7)
        if rows == 2:
            ax = axes[1][j]
            ax.scatter(m["loo"]["predicted"], loo_actual, s=14, color="C1")
            ax.set_title(f"leave-one-out: Pearson {m['loo']['pearson']:.2f}", fontsize=8)
            ax.set_xlabel("predicted Δ val loss", fontsize=7)
            ax.set_ylabel("measured Δ (LOO)", fontsize=7)
    fig.tight_layout()
    atomic_write(folder / SCATTER_PLOT, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return SCATTER_PLOT


# ---------------------------------------------------------------------------------------------------
# The printed summary


def _iv(d: Mapping[str, Any], scale: float = 1.0, fmt: str = ".3f", sign: str = "") -> str:
    return (f"{scale * d['value']:{sign}{fmt}} [{scale * d['low']:{sign}{fmt}}, "
            f"{scale * d['high']:{sign}{fmt}}]")


def _lds_table(results: Mapping[str, Any]) -> list[str]:
    level = 100 * results["settings"]["interval_level"]
    lines = [
        f"| score | LDS (Spearman) [{level:g}% CI] | LOO Pearson [{level:g}% CI] | LOO Spearman |",
        "|---|---|---|---|",
    ]
    for name, m in results["columns"].items():
        if "lds" not in m:
            lines.append(f"| {name} | n/a: {m['note']} | — | — |")
            continue
        loo = m.get("loo")
        loo_p = "—" if loo is None else _iv(loo["pearson_interval"])
        loo_s = "—" if loo is None else f"{loo['spearman']:.3f}"
        lines.append(f"| {name} | {_iv(m['lds'])} | {loo_p} | {loo_s} |")
    return lines


def _prune_table(prune: Mapping[str, Any], level: float) -> list[str]:
    pts = functools.partial(_iv, scale=100.0, fmt=".1f", sign="+")
    lines = [
        f"Pruning check: each column's lowest {100 * prune['fraction']:g}% ({prune['n_removed']} pairs) "
        f"removed vs {prune['draws']} random draws of as many pairs, retrained; test accuracy on "
        f"{prune['n_test']} test pairs. {prune['note']}",
        "",
        f"| removed | test accuracy (%) | Δ vs random, points [{100 * level:g}% CI] "
        "| Δ vs unpruned, points |",
        "|---|---|---|---|",
        f"| nothing (unpruned) | {100 * prune['unpruned_accuracy']:.1f} | — | — |",
        f"| random (mean of {prune['draws']}) | {100 * prune['random']['accuracy']:.1f} | — | "
        f"{pts(prune['random']['delta_vs_unpruned'])} |",
    ]
    for name, c in prune["columns"].items():
        lines.append(f"| lowest {name} | {100 * c['accuracy']:.1f} | {pts(c['delta_vs_random'])} | "
                     f"{pts(c['delta_vs_unpruned'])} |")
    return lines


def _recommendation_lines(rec: Mapping[str, Any] | None, results: Mapping[str, Any]) -> list[str]:
    if rec is None:
        return []
    best = rec["recommended"]
    if best is None:
        return ["No damping recommended: no influence column has a finite score."]
    level = 100 * results["settings"]["interval_level"]
    fmt = _iv if best["by"] == "lds" else functools.partial(_iv, scale=100.0, fmt=".1f", sign="+")
    what = "LDS" if best["by"] == "lds" else "Δ test accuracy vs random, points"
    text = f"Recommended damping: {best['damping']:g} ({what} {fmt(best['value'])})"
    if "runner_up" in best:
        ru = best["runner_up"]
        verb = "is distinguishable" if best["distinguishable_from_runner_up"] else "is not distinguishable"
        why = "do not overlap" if best["distinguishable_from_runner_up"] else "overlap"
        text += f" {verb} from {ru['damping']:g} ({fmt(ru['value'])}): their {level:g}% intervals {why}"
    if "damping_by_loo" in best:
        text += f"; best leave-one-out Pearson at {best['damping_by_loo']:g}"
    lines = [text + "."]
    if not best["value"]["low"] > 0:
        lines.append("Its interval does not lie above 0: " + (
            "its scores are not shown to track retraining here." if best["by"] == "lds"
            else "no influence column is shown to beat random pruning here."))
    if best["by"] == "lds":
        lines.append("It rests on the LDS (validation-loss changes under random subsets), not on a pruning "
                     "gain; --prune-check FRACTION with test pairs measures that.")
    else:
        lines.append("It rests on the pruning check (test accuracy after removing each influence column's "
                     "lowest pairs, against random).")
        lds = rec["by_lds"]
        if lds is not None and lds["damping"] != best["damping"]:
            lines.append(f"The LDS alone would pick {lds['damping']:g} ({_iv(lds['value'])}).")
    return lines


def validation_summary(results: Mapping[str, Any]) -> str:
    """What was measured, a markdown table of every column's LDS (and LOO correlation) with intervals, the
    pruning check's table when it ran, and the recommendation with the check it rests on."""
    s = results["settings"]
    lines = [
        f"LDS: rank agreement (Spearman) of predicted and measured validation-loss changes over "
        f"{len(results['subsets'])} retrains on random subsets keeping {100 * s['fraction']:g}% of the "
        "training pairs. LOO Pearson: the same for single-pair removals. A good LDS does not imply a pruning "
        "gain (validation loss, not test accuracy after pruning).",
        "",
        *_lds_table(results),
    ]
    if results.get("prune_check"):
        lines += ["", *_prune_table(results["prune_check"], s["interval_level"])]
    rec = _recommendation_lines(results.get("recommendation"), results)
    if rec:
        lines += ["", *rec]
    lines += [f"WARNING: {w}" for w in curvature_warnings(results.get("curvature_scale"))]
    return "\n".join(lines)
