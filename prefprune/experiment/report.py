"""Turn an experiment's results.json into report.md (tables, flags, profile) and its PNG plots (`plots`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefprune._io import atomic_write_text
from prefprune.experiment.announce import format_duration
from prefprune.experiment.certainty import arm_flags
from prefprune.experiment.counts import LOAD_DROPS
from prefprune.experiment.plots import write_plots
from prefprune.experiment.profile import profile_section
from prefprune.influence.scale import curvature_warnings

__all__ = [
    "accuracy_table",
    "detection_table",
    "distinguishable",
    "interval_table",
    "render_markdown",
    "spread_note",
    "write_plots",
    "write_report",
]



def _pct(x: float | None, *, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _pm(mean: float | None, std: float | None, *, signed: bool = False) -> str:
    """"mean ± std" in %; the mean alone when there is no std (one seed: the tables say so above them)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if std is None:
        return _pct(mean, signed=signed)
    return f"{_pct(mean, signed=signed)} ± {_pct(std)}"


def spread_note(results: Mapping[str, Any]) -> str:
    """What the ± in the tables is, or why there is none."""
    n = (results.get("intervals") or {}).get("n_seeds", results["baseline"].get("n_seeds", 0))
    if n == 1:
        return "Test accuracy in %; std over seeds: n/a (1 seed)."
    return f"Test accuracy in %, mean ± sample std over {n} seeds."


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


def _flag_line(flag: Mapping[str, Any]) -> str:
    """One flag as a plain sentence that says what the difference means."""
    against = "the unpruned baseline" if flag["against"] == "unpruned" else "random pruning"
    end = "harmful" if flag["mode"] == "harmful" else "helpful"
    what = f"{flag['method']} (removing the {100 * flag['fraction']:g}% it ranks most {end})"
    if flag["method"] == "random":
        what = f"random pruning ({100 * flag['fraction']:g}% removed)"
    delta = f"Δ {_ci(flag['interval']).rstrip(' *')} points"
    if flag["expected"] is None:
        line = f"- {what} is {flag['direction']} than {against}: {delta}."
    elif flag["expected"]:
        line = (f"- As expected, {what} is worse than {against}: {delta}. This confirms the ranking (the "
                "pairs it calls helpful do help); it is not a failure.")
    else:
        line = (f"- **Unexpected direction**: {what} is better than {against}: {delta}. Removing the pairs "
                "it ranks most helpful should not raise accuracy: its ranking points the wrong way here.")
    if flag["provisional"]:
        line += f" *Provisional: {flag['n_seeds']} seed(s).*"
    return line


def distinguishable(results: Mapping[str, Any]) -> str:
    """The arms whose Δ interval excludes zero as sentences grouped by arm, or a sentence saying none does."""
    arms = results["summary"]["arms"]
    if not any(r.get("delta_interval") for r in arms):
        return "No intervals: the step files hold no per-pair test margins (a run from an older version)."
    flags = results["summary"].get("flags")
    flags = arm_flags(arms) if flags is None else flags
    if not flags:
        return (
            "No difference is distinguishable from zero: every interval, against the unpruned baseline and "
            "against random pruning, contains 0."
        )
    out = ["Distinguishable from zero (the interval excludes 0):"]
    for mode, title in (("harmful", "Pruning the most harmful pairs"),
                        ("helpful", "Helpful arm (removing the most helpful pairs; expected: worse)")):
        lines = [_flag_line(f) for f in flags if f["mode"] == mode]
        if lines:
            out += ["", f"{title}:", "", *lines]
    return "\n".join(out)


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
        auc = "n/a" if d["auc_mean"] is None else f"{d['auc_mean']:.3f}"
        if d["auc_mean"] is not None and d.get("auc_std") is not None:
            auc += f" ± {d['auc_std']:.3f}"
        prec = _pm(d["precision_at_k_mean"], d.get("precision_at_k_std"))
        name = d["method"] + (" (chance)" if d["method"] == "random" else "")
        lines.append(f"| {name} | {auc} | {prec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Why pairs of a split were left out, as the counts table says it.
_LEFT_OUT = {"too_long": "too long for max_length", "untrusted": "flipped (trusted_validation)",
             "not_scored": "not scored (no method needs scores)"}
#: What "used" means per split.
_USED = {"train": "trained on", "validation": "scored against", "test": "evaluated"}


def _data_lines(results: Mapping[str, Any]) -> list[str]:
    """Where the data came from, what loading dropped, and per split the pairs in it, left out and used."""
    cfg, data = results["config"], results["data"]
    counts = data.get("counts")
    split = (f"one split (seed {cfg['split_seed']}) shared by all seeds; validation is used only for "
             "scoring, test only for accuracy")
    if not counts:  # results.json of an older version: the split's sizes only
        return [f"Data: `{data['source']}` ({data['schema']}), {data['n_pairs']} pairs → train "
                f"{data['n_train']} / validation {data['n_validation']} / test {data['n_test']} ({split})."]
    loaded = counts["loaded"]
    drops = ", ".join(f"{k.replace('_', ' ')} {loaded[k]}" for k in LOAD_DROPS if k in loaded)
    read = f"{loaded['records']} records read → " if "records" in loaded else ""
    out = [f"Data: `{data['source']}` ({data['schema']}): {read}{loaded['pairs']} pairs"
           + (f" (dropped on loading: {drops})" if drops else "") + f"; {split}.", ""]
    out += ["| split | in split | left out | used |", "|---|---|---|---|"]
    for name in ("train", "validation", "test"):
        c = counts[name]
        why = [f"{c[k]} {_LEFT_OUT.get(k, k)}" for k in c if k not in ("in_split", "used") and c[k]]
        out.append(f"| {name} | {c['in_split']} | {'; '.join(why) or '0'} | {c['used']} ({_USED[name]}) |")
    return out + [""]


def _kv(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def _settings_lines(results: Mapping[str, Any]) -> list[str]:
    """The settings every step ran with, read from the step files (not the config's defaults)."""
    run, cfg = results.get("settings_as_run"), results["config"]
    if not run:  # results.json of an older version: the config as given
        return [f"Settings (config): max_length {cfg['max_length']}; training "
                f"{cfg.get('train') or 'defaults'}; scoring {cfg.get('score') or 'defaults'}."]
    out = []
    parts = [("Training", run.get("train"))]
    parts += [(f"Scoring ({c})", s) for c, s in run.get("score", {}).items()]
    for what, s in parts:
        if s:
            differ = s.get("differs_between_steps")
            note = f" (differs between steps: {', '.join(differ)})" if differ else ""
            out.append(f"{what} as run, from the step files: {_kv(s['settings'])}{note}.")
    out.append(f"Evaluation as run: {_kv(run['evaluation'])}.")
    return out


def _interval_lines(results: Mapping[str, Any]) -> list[str]:
    """How the intervals were computed and, with fewer than 3 seeds, the warning (old results: neither)."""
    note = results.get("intervals")
    if not note:
        return []
    out = [f"Intervals: {note['method']}."]
    if note.get("warning"):
        out += ["", f"> **Warning:** {note['warning']}", ""]
    return out


def _header(results: Mapping[str, Any]) -> list[str]:
    cfg, data = results["config"], results["data"]
    t = results.get("timings", {})
    out = [f"# Pruning experiment: {Path(cfg['output']).name}", ""]
    out += _data_lines(results)
    if data.get("n_flipped", 0) > 0:
        out.append(
            f"Planted label noise: {data['n_flipped']} flipped pairs ({data['n_flipped_train']} in train, "
            f"{data['n_flipped_validation']} in validation, {data['n_flipped_test']} in test)."
        )
    lora_layers = cfg.get("lora_layers")
    out.append(
        f"Model: `{cfg['model']}`, LoRA {_set_values(cfg.get('lora')) or 'defaults'}"
        + (f", adapters on the top {lora_layers} layer(s) only" if lora_layers else "")
        + f"; curvatures {cfg['curvatures']}."
    )
    out += _settings_lines(results)
    out.append(
        f"Seeds {cfg['seeds']} (initialisation and data order; every retrain starts from its seed's initial "
        "weights with the same hyperparameters). Accuracy is pairwise test accuracy in %, mean ± sample std "
        "over seeds; Δ is the paired difference to the same seed's unpruned baseline."
    )
    out += _interval_lines(results)
    machine = results.get("machine", {})
    gpu = f", {machine['cuda_device']}" if machine.get("cuda_device") else ""
    out.append(
        f"Machine: {machine.get('processor', '?')}, {machine.get('cpu_count', '?')} CPUs, torch threads "
        f"{machine.get('torch_threads', '?')}{gpu}. "
        f"Compute time of all steps: {format_duration(t.get('sum_of_step_seconds'))}; this invocation: "
        f"{format_duration(t.get('this_invocation_seconds'))}."
    )
    return _paragraphs(out)


def _set_values(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings that were given a value (None means "the default" and is left out)."""
    return {k: v for k, v in (settings or {}).items() if v is not None}


def _paragraphs(lines: list[str]) -> list[str]:
    """`lines` with a blank line between two adjacent text lines, so that Markdown renders each as its own
    paragraph (table rows stay together)."""
    out: list[str] = []
    for line in lines:
        if out and out[-1] and line and not (out[-1].startswith("|") and line.startswith("|")):
            out.append("")
        out.append(line)
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
        "Removed: lowest influence / grad_dot / grad_cos, highest train_loss, or a random draw. "
        + spread_note(results),
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


def _detection_section(results: Mapping[str, Any]) -> list[str]:
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
    return out


#: How each solve method reads in the scoring table (CG iterations and residual only for iterative ones).
_SOLVERS = {"direct": "direct (eigendecomposition)", "none": "no solve (identity)", "cg": "CG",
            "pcg": "preconditioned CG", "multishift": "multi-shift CG"}


def _solve_cells(meta: Any) -> str:
    """Solver, status, iterations, residual of one score run: a direct solve has no CG numbers to show."""
    s = meta.get("solve", {}) if isinstance(meta, Mapping) else {}
    method = s.get("method")
    if method in ("direct", "none"):
        return f"{_SOLVERS[method]} | {_status_cell(meta)} | — | —"
    res = s.get("residual")
    name = _SOLVERS.get(method, method or "n/a")
    return (f"{name} | {_status_cell(meta)} | {s.get('iterations', 'n/a')} | "
            f"{'n/a' if res is None else f'{res:.2g}'}")


def _solves_section(results: Mapping[str, Any]) -> list[str]:
    solves = results.get("scores", {}).get("metadata", {})
    if not solves:
        return []
    out = [
        "",
        "## Scoring runs",
        "",
        "| seed/curvature | solver | solve status | CG iterations | residual | seconds | damping |",
        "|---|---|---|---|---|---|---|",
    ]
    secs = results["scores"].get("seconds", {})
    for key, meta in solves.items():
        out.append(
            f"| {key} | {_solve_cells(meta)} | {secs.get(key, float('nan')):.1f} | {_damping_cell(meta)} |"
        )
    warn = [f"- WARNING ({key}): {w}" for key, meta in solves.items() if isinstance(meta, Mapping)
            for w in curvature_warnings(meta.get("curvature_scale"))]
    out += ["", *warn] if warn else []
    return out


def render_markdown(results: Mapping[str, Any], *, plots: Sequence[str] = ()) -> str:
    """The full report.md text."""
    out = _header(results) + _pruning_sections(results) + _detection_section(results)
    out += profile_section(results) + _solves_section(results)
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{Path(p).stem}]({p})" for p in plots]
    out.append("")
    return "\n".join(out)


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
