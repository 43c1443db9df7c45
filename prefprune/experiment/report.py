"""Turn an experiment's results.json into report.md tables and PNG plots (matplotlib Agg, imported lazily)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefprune._io import atomic_write, atomic_write_text
from prefprune.influence.scale import curvature_warnings

logger = logging.getLogger(__name__)

__all__ = [
    "accuracy_table",
    "detection_table",
    "distinguishable",
    "interval_table",
    "render_markdown",
    "write_plots",
    "write_report",
]

ACCURACY_PLOT = "accuracy_vs_fraction.png"
HISTOGRAM_PLOT = "score_histograms.png"


def _pct(x: float | None, *, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _pm(mean: float | None, std: float | None, *, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{_pct(mean, signed=signed)} ± {_pct(std)}"


def _fractions(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    return sorted({float(r["fraction"]) for r in rows})


def accuracy_table(results: Mapping[str, Any], *, mode: str = "harmful", clean: bool = False) -> str:
    """A markdown table: one row per method, one column per fraction, "accuracy ± std (Δ ± std)" in %.

    Args:
        results: the dict written to results.json.
        mode: "harmful" (the pruning arm) or "helpful" (the helpful arm).
        clean: use accuracy on the test pairs without planted noise (only when noise was planted).
    """
    rows = [r for r in results["summary"]["arms"] if r["mode"] == mode]
    if not rows:
        return ""
    key = "clean_accuracy" if clean else "accuracy"
    dkey = "clean_delta" if clean else "delta"
    base = results["baseline"]
    fracs = _fractions(rows)
    head = "| method | " + " | ".join(f"remove {100 * f:g}%" for f in fracs) + " |"
    lines = [head, "|---|" + "---|" * len(fracs)]
    b_mean = base.get(f"{key}_mean")
    b_std = base.get(f"{key}_std")
    lines.append("| *unpruned baseline* | " + " | ".join(_pm(b_mean, b_std) for _ in fracs) + " |")
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for f in fracs:
            r = next((x for x in rows if x["method"] == method and float(x["fraction"]) == f), None)
            if r is None or f"{key}_mean" not in r:
                cells.append("—")
                continue
            acc = _pm(r[f"{key}_mean"], r[f"{key}_std"])
            delta = _pm(r[f"{dkey}_mean"], r[f"{dkey}_std"], signed=True)
            cells.append(f"{acc} (Δ {delta})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ci(iv: Mapping[str, Any] | None) -> str:
    if not iv:
        return "n/a"
    mark = " *" if iv["excludes_zero"] else ""
    lo, hi = _pct(iv["low"], signed=True), _pct(iv["high"], signed=True)
    return f"{_pct(iv['value'], signed=True)} [{lo}, {hi}]{mark}"


def interval_table(results: Mapping[str, Any], *, mode: str = "harmful") -> str:
    """A markdown table of each arm's Δ accuracy (points) with its paired bootstrap interval, vs the
    unpruned baseline and vs random pruning at the same fraction; ``*`` = the interval excludes zero."""
    rows = [r for r in results["summary"]["arms"] if r["mode"] == mode and r.get("delta_interval")]
    if not rows:
        return ""
    level = rows[0]["delta_interval"]["level"]
    lines = [
        f"| method | removed | Δ vs unpruned [{100 * level:g}% CI] | Δ vs random [{100 * level:g}% CI] |",
        "|---|---|---|---|",
    ]
    for r in rows:
        vs_random = "—" if r["method"] == "random" else _ci(r.get("delta_vs_random_interval"))
        lines.append(
            f"| {r['method']} | {100 * r['fraction']:g}% | {_ci(r['delta_interval'])} | {vs_random} |"
        )
    return "\n".join(lines)


def distinguishable(results: Mapping[str, Any]) -> str:
    """One plain sentence per arm whose Δ interval excludes zero, or a sentence saying none does."""
    said = []
    for r in results["summary"]["arms"]:
        for key, what in (
            ("delta_interval", "the unpruned baseline"),
            ("delta_vs_random_interval", "random pruning"),
        ):
            iv = r.get(key)
            if iv and iv["excludes_zero"]:
                word = "better" if iv["value"] > 0 else "worse"
                said.append(
                    f"- {r['method']} ({r['mode']} arm, {100 * r['fraction']:g}% removed) is {word} than "
                    f"{what}: "
                    f"Δ {_ci(iv).rstrip(' *')} points."
                )
    if not any(r.get("delta_interval") for r in results["summary"]["arms"]):
        return "No intervals: the step files hold no per-pair test margins (a run from an older version)."
    if not said:
        return (
            "No difference is distinguishable from zero: every interval, against the unpruned baseline and "
            "against random pruning, contains 0."
        )
    return "Distinguishable from zero (the interval excludes 0):\n\n" + "\n".join(said)


def detection_table(results: Mapping[str, Any]) -> str:
    """A markdown table of noise-detection AUC and precision@k per score (mean ± std over seeds)."""
    det = results["summary"].get("noise_detection") or []
    if not det:
        return ""
    arms = [r for r in results["summary"]["arms"] if r["mode"] == "harmful"]
    fracs = _fractions(arms)
    head = (
        "| score | AUC | precision@k | "
        + " | ".join(f"flipped share of removed {100 * f:g}%" for f in fracs)
        + " |"
    )
    lines = [head, "|---|---|---|" + "---|" * len(fracs)]
    for d in det:
        cells = []
        for f in fracs:
            r = next((x for x in arms if x["method"] == d["method"] and float(x["fraction"]) == f), None)
            cells.append("—" if r is None else _pct(r["flipped_share_of_removed"]))
        auc = "n/a" if d["auc_mean"] is None else f"{d['auc_mean']:.3f} ± {d['auc_std']:.3f}"
        prec = f"{_pct(d['precision_at_k_mean'])} ± {_pct(d['precision_at_k_std'])}"
        name = d["method"] + (" (chance)" if d["method"] == "random" else "")
        lines.append(f"| {name} | {auc} | {prec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def _header(results: Mapping[str, Any]) -> list[str]:
    cfg, data = results["config"], results["data"]
    t = results.get("timings", {})
    out = [f"# Pruning experiment: {Path(cfg['output']).name}", ""]
    out.append(
        f"Data: `{data['source']}` ({data['schema']}), {data['n_pairs']} pairs → train {data['n_train']} / "
        f"validation {data['n_validation']} / test {data['n_test']} (one split, seed {cfg['split_seed']}, "
        "shared by all seeds; validation is used only for scoring, test only for accuracy)."
    )
    if data.get("n_flipped", 0) > 0:
        out.append(
            f"Planted label noise: {data['n_flipped']} flipped pairs ({data['n_flipped_train']} in train, "
            f"{data['n_flipped_validation']} in validation, {data['n_flipped_test']} in test)."
        )
    lora_layers = cfg.get("lora_layers")
    out.append(
        f"Model: `{cfg['model']}`, LoRA {cfg.get('lora') or 'defaults'}"
        + (f", adapters on the top {lora_layers} layer(s) only" if lora_layers else "")
        + f"; max_length {cfg['max_length']}; training {cfg.get('train') or 'defaults'}; "
        f"scoring {cfg.get('score') or 'defaults'}; curvatures {cfg['curvatures']}."
    )
    out.append(
        f"Seeds {cfg['seeds']} (initialisation and data order; every retrain starts from its seed's initial "
        "weights with the same hyperparameters). Accuracy is pairwise test accuracy in %, mean ± sample std "
        "over seeds; Δ is the paired difference to the same seed's unpruned baseline. Intervals: paired "
        "bootstrap over seeds and test pairs (both drawn with replacement, the same draw for both arms)."
    )
    machine = results.get("machine", {})
    gpu = f", {machine['cuda_device']}" if machine.get("cuda_device") else ""
    out.append(
        f"Machine: {machine.get('processor', '?')}, {machine.get('cpu_count', '?')} CPUs, torch threads "
        f"{machine.get('torch_threads', '?')}{gpu}. "
        f"Compute time of all steps: {_fmt_seconds(t.get('sum_of_step_seconds'))}; this invocation: "
        f"{_fmt_seconds(t.get('this_invocation_seconds'))}."
    )
    return out


def _pruning_sections(results: Mapping[str, Any]) -> list[str]:
    base, noisy = results["baseline"], results["data"].get("n_flipped", 0) > 0
    out = ["", "## Unpruned baseline", ""]
    clean = ""
    if noisy and "clean_accuracy_mean" in base:
        clean_acc = _pm(base["clean_accuracy_mean"], base["clean_accuracy_std"])
        clean = f"; on the test pairs without planted noise {clean_acc}"
    out.append(
        f"Test accuracy {_pm(base.get('accuracy_mean'), base.get('accuracy_std'))} over "
        f"{base.get('n_seeds', 0)} seed(s){clean}."
    )
    out += [
        "",
        "## Pruning the most harmful pairs",
        "",
        "Removed: lowest influence / grad_dot / grad_cos, highest train_loss, or a random draw.",
        "",
        accuracy_table(results, mode="harmful"),
    ]
    intervals = interval_table(results, mode="harmful")
    if intervals:
        out += ["", "Δ accuracy in points with its interval (`*`: the interval excludes 0):", "", intervals]
    if noisy and any("clean_accuracy_mean" in r for r in results["summary"]["arms"]):
        out += [
            "",
            "Same, measured on the test pairs whose labels were not flipped:",
            "",
            accuracy_table(results, mode="harmful", clean=True),
        ]
    helpful = accuracy_table(results, mode="helpful")
    if helpful:
        out += [
            "",
            "## Helpful arm: removing the most helpful pairs",
            "",
            "Removed: the *highest* scores (lowest train_loss). A score that finds helpful pairs well "
            "hurts accuracy most here.",
            "",
            helpful,
        ]
        intervals = interval_table(results, mode="helpful")
        if intervals:
            out += ["", intervals]
    out += ["", "## Which differences are distinguishable from zero", "", distinguishable(results)]
    return out


def _damping_cell(meta: Any) -> str:
    """The damping value(s) of one score run (its sidecar's config), `:g` as in the method names."""
    damping = (meta.get("config") or {}).get("damping") if isinstance(meta, Mapping) else None
    if damping is None:  # the default damping: a factor of trace(H)/p
        factor = (meta.get("solve") or {}).get("damping_factor") if isinstance(meta, Mapping) else None
        return "n/a" if factor is None else f"{factor:g} × trace(H)/p (default)"
    values = damping if isinstance(damping, list) else [damping]
    return ", ".join(f"{float(v):g}" for v in values)


def _status_cell(meta: Any) -> str:
    """The solve status; for a damping sweep, one status per value when they differ."""
    if not isinstance(meta, Mapping):
        return "n/a"
    cols = meta.get("damping_columns") or []
    statuses = [c.get("status", "n/a") for c in cols]
    if len(set(statuses)) > 1:
        return ", ".join(statuses)
    return str((meta.get("solve") or {}).get("status", "n/a"))


def _detection_and_solves(results: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    det = detection_table(results)
    if det:
        out += [
            "",
            "## Noise detection",
            "",
            f"How well each score ranks the {results['data']['n_flipped_train']} flipped training pairs "
            "first "
            "(low influence / grad_dot / grad_cos = suspect, high train_loss = suspect). AUC: Mann–Whitney "
            "rank statistic, 0.5 = chance; precision@k with k = number of flipped training pairs.",
            "",
            det,
        ]
    solves = results.get("scores", {}).get("metadata", {})
    if solves:
        out += [
            "",
            "## Scoring runs",
            "",
            "| seed/curvature | solve status | CG iterations | residual | seconds | damping |",
            "|---|---|---|---|---|---|",
        ]
        secs = results["scores"].get("seconds", {})
        for key, meta in solves.items():
            s = meta.get("solve", {}) if isinstance(meta, Mapping) else {}
            res = s.get("residual")
            out.append(
                f"| {key} | {_status_cell(meta)} | {s.get('iterations', 'n/a')} | "
                f"{'n/a' if res is None else f'{res:.2g}'} | {secs.get(key, float('nan')):.1f} | "
                f"{_damping_cell(meta)} |"
            )
        warn = [f"- WARNING ({key}): {w}" for key, meta in solves.items() if isinstance(meta, Mapping)
                for w in curvature_warnings(meta.get("curvature_scale"))]
        out += ["", *warn] if warn else []
    return out


def render_markdown(results: Mapping[str, Any], *, plots: Sequence[str] = ()) -> str:
    """The full report.md text."""
    out = _header(results) + _pruning_sections(results) + _detection_and_solves(results)
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{Path(p).stem}]({p})" for p in plots]
    out.append("")
    return "\n".join(out)


def write_plots(results: Mapping[str, Any], folder: str | os.PathLike) -> list[str]:
    """Accuracy vs pruned fraction per method, and score histograms split by flipped/clean.

    Returns:
        The PNG file names written (relative to `folder`); empty when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'prefprune[plots]')")
        return []
    folder = Path(folder)
    written = []
    arms = results["summary"]["arms"]
    base = results["baseline"]
    if arms and base.get("accuracy_mean") is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode, style in (("harmful", "-o"), ("helpful", "--s")):
            for method in dict.fromkeys(r["method"] for r in arms if r["mode"] == mode):
                rows = sorted(
                    (r for r in arms if r["mode"] == mode and r["method"] == method),
                    key=lambda r: r["fraction"],
                )
                xs = [0.0] + [100 * r["fraction"] for r in rows]
                ys = [100 * base["accuracy_mean"]] + [100 * r["accuracy_mean"] for r in rows]
                es = [100 * (base.get("accuracy_std") or 0.0)] + [100 * r["accuracy_std"] for r in rows]
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=f"{method} ({mode})", alpha=0.85)
        ax.set_xlabel("training pairs removed (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Accuracy after pruning and retraining (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        atomic_write(folder / ACCURACY_PLOT, lambda fh, fig=fig: fig.savefig(fh, format="png", dpi=110))
        plt.close(fig)
        written.append(ACCURACY_PLOT)
    hists = results.get("histograms") or {}
    if hists:
        names = list(hists)
        ncol = min(3, len(names))
        nrow = math.ceil(len(names) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            groups = hists[name]
            every = [v for values in groups.values() for v in values]
            # Shared bin edges, so the flipped and clean histograms are comparable bar for bar.
            edges = np.histogram_bin_edges(every, bins=30) if every else 30
            for label, values in groups.items():
                if values:
                    ax.hist(values, bins=edges, alpha=0.6, label=f"{label} ({len(values)})", density=True)
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.suptitle("Score distributions (first seed)", fontsize=10)
        fig.tight_layout()
        atomic_write(folder / HISTOGRAM_PLOT, lambda fh, fig=fig: fig.savefig(fh, format="png", dpi=110))
        plt.close(fig)
        written.append(HISTOGRAM_PLOT)
    return written


def write_report(
    results: Mapping[str, Any] | str | os.PathLike, folder: str | os.PathLike | None = None
) -> Path:
    """Write report.md and the plots next to results.json.

    Args:
        results: the results dict, or the path of a results.json.
        folder: output folder (default: the folder of results.json).

    Returns:
        The path of report.md.
    """
    if not isinstance(results, Mapping):
        path = Path(results)
        folder = folder or path.parent
        results = json.loads(path.read_text(encoding="utf-8"))
    if folder is None:
        raise ValueError("folder is required when results is a dict")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, folder)
    report = folder / "report.md"
    atomic_write_text(report, render_markdown(results, plots=plots))
    return report
