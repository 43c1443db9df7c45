"""What each method removes: a profile of the removed pairs (response length, agreement with the "longer
response wins" rule, planted flips, against the training set's base rates) and the overlap of the methods'
removed sets (Jaccard), for results.json and report.md."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["length_sign", "profile_section", "removed_profile"]


def length_sign(pairs: Sequence[Any]) -> dict[str, int]:
    """Pair id -> sign(len(chosen) - len(rejected)) in characters: -1 the chosen response is shorter."""
    return {p.id: int(np.sign(len(p.chosen) - len(p.rejected))) for p in pairs}


def _shares(ids: Sequence[str], sign: Mapping[str, int], flipped: set[str] | None) -> dict[str, Any]:
    """Of `ids`: the chosen-shorter share, agreement with "longer wins" (a tie counts ½, as a coin would)
    and, with planted noise, the flipped share."""
    s = np.asarray([sign[i] for i in ids], dtype=np.float64)
    out: dict[str, Any] = {
        "n": len(ids),
        "chosen_shorter": float(np.mean(s < 0)),
        "longer_wins_agreement": float(np.mean((s > 0) + 0.5 * (s == 0))),
    }
    out["flipped"] = None if flipped is None else float(np.mean([i in flipped for i in ids]))
    return out


def _jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _overlap(by_arm: Mapping[tuple, Mapping[int, Sequence[str]]]) -> list[dict[str, Any]]:
    """Jaccard of the removed id sets of every two methods of the same arm and fraction, mean over the seeds
    both have."""
    out = []
    for (m1, mode, f), (m2, mode2, f2) in itertools.combinations(by_arm, 2):
        if (mode, f) != (mode2, f2):
            continue
        seeds = sorted(set(by_arm[(m1, mode, f)]) & set(by_arm[(m2, mode, f)]))
        if seeds:
            values = [_jaccard(by_arm[(m1, mode, f)][s], by_arm[(m2, mode, f)][s]) for s in seeds]
            out.append({"mode": mode, "fraction": f, "methods": [m1, m2], "jaccard": float(np.mean(values)),
                        "n_seeds": len(seeds)})
    return out


def removed_profile(
    train: Sequence[Any],
    test: Sequence[Any],
    removed: Mapping[tuple, Sequence[str]],
    flipped: set[str] | None,
) -> dict[str, Any]:
    """The profile of each arm's removed pairs (mean over seeds), the base rates and the overlaps.

    Args:
        train: the training pairs as used (the base rates).
        test: the test pairs (the "longer wins" rule's test accuracy: a baseline a reward model should beat).
        removed: (seed, method, mode, fraction) -> removed ids of that retrain.
        flipped: ids with planted (known) flipped labels; None when the data has no planted noise.
    """
    sign = length_sign(train)
    by_arm: dict[tuple, dict[int, Sequence[str]]] = {}
    for (seed, *arm), ids in removed.items():
        by_arm.setdefault(tuple(arm), {})[seed] = ids
    arms = []
    for (method, mode, fraction), per_seed in by_arm.items():
        rows = [_shares(ids, sign, flipped) for ids in per_seed.values()]
        mean = {k: (None if rows[0][k] is None else float(np.mean([r[k] for r in rows])))
                for k in ("chosen_shorter", "longer_wins_agreement", "flipped")}
        arms.append({"method": method, "mode": mode, "fraction": fraction, "n_seeds": len(rows),
                     "n_removed": rows[0]["n"], **mean})
    test_rule = _shares([p.id for p in test], length_sign(test), None)["longer_wins_agreement"]
    return {
        "length_unit": "characters of the response",
        "base_rate": _shares(list(sign), sign, flipped),
        "arms": arms,
        "overlap": _overlap(by_arm),
        "longer_wins_test_accuracy": test_rule,
    }


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _arm_rows(prof: Mapping[str, Any]) -> list[str]:
    base = prof["base_rate"]
    rows = [f"| *training set (base rate)* | — | {base['n']} pairs | {_pct(base['chosen_shorter'])} | "
            f"{_pct(base['longer_wins_agreement'])} | {_pct(base['flipped'])} |"]
    for r in prof["arms"]:
        shares = " | ".join(_pct(r[k]) for k in ("chosen_shorter", "longer_wins_agreement", "flipped"))
        rows.append(f"| {r['method']} | {r['mode']} | {100 * r['fraction']:g}% | {shares} |")
    return rows


def profile_section(results: Mapping[str, Any]) -> list[str]:
    """The "What each method removes" section of report.md (empty for results without a profile)."""
    prof = results.get("removed_profile")
    if not prof or not prof["arms"]:
        return []
    out = ["", "## What each method removes", "",
           "Of the removed training pairs (mean over seeds), in %: the chosen response shorter than the "
           f"rejected one ({prof['length_unit']}), agreement with the rule \"the longer response wins\" (a "
           "tie counts ½) and the share of planted flipped labels; the first row is the training set's base "
           "rate. "
           f"The rule alone scores {_pct(prof['longer_wins_test_accuracy'])}% on the test pairs.", "",
           "| method | arm | removed | chosen shorter | agrees with longer-wins | flipped |",
           "|---|---|---|---|---|---|", *_arm_rows(prof)]
    if prof["overlap"]:
        out += ["", "Overlap of the removed sets (Jaccard |A∩B| / |A∪B|, mean over seeds; two random draws "
                "of a share f overlap by about f / (2 − f)):", "",
                "| arm | removed | methods | Jaccard |", "|---|---|---|---|"]
        out += [f"| {o['mode']} | {100 * o['fraction']:g}% | {' vs '.join(o['methods'])} | "
                f"{o['jaccard']:.2f} |" for o in prof["overlap"]]
    return out
