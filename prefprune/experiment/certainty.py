"""How sure an experiment's numbers are: how the intervals were computed, the warning that too few seeds
need, and each interval that excludes zero as a flag saying what it means."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["INTERVAL_METHOD", "MIN_SEEDS", "arm_flags", "interval_note"]

#: Fewer seeds than this: the report warns and calls its flags provisional.
MIN_SEEDS = 3
INTERVAL_METHOD = (
    "paired two-level (crossed) percentile bootstrap: each resample draws the seeds and the test pairs with "
    "replacement, independently (the test pairs are shared by all seeds, so one draw of pairs serves every "
    "drawn seed), the same draw for both arms; with >= 2 seeds it holds seed-to-seed variance, with 1 seed "
    "test-pair sampling only"
)

def interval_note(n_seeds: int) -> dict[str, Any]:
    """How the intervals were computed for `n_seeds` seeds, and the warning they need below `MIN_SEEDS`."""
    note: dict[str, Any] = {
        "method": INTERVAL_METHOD,
        "n_seeds": n_seeds,
        "seed_variance": n_seeds >= 2,
        "min_seeds": MIN_SEEDS,
        "warning": None,
    }
    if n_seeds == 1:
        note["warning"] = (
            "1 seed: the intervals hold test-pair sampling only, no seed-to-seed variance (another seed's "
            "retrain can move accuracy by more than they show), and no std over seeds exists. Treat every "
            f"flag as provisional; run at least {MIN_SEEDS} seeds before trusting a difference."
        )
    elif 1 < n_seeds < MIN_SEEDS:
        note["warning"] = (
            f"{n_seeds} seeds: the seed-to-seed variance in the intervals and the std rest on {n_seeds} "
            f"values; treat every flag as provisional and run at least {MIN_SEEDS} seeds."
        )
    return note


def arm_flags(summary_arms: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each arm's interval that excludes zero, with what it means: for the harmful arm a gain or a loss; for
    the helpful arm a loss is the expected outcome (it confirms the ranking), a gain the unexpected one."""
    flags = []
    for r in summary_arms:
        for key, against in (("delta_interval", "unpruned"), ("delta_vs_random_interval", "random")):
            iv = r.get(key)
            if not iv or not iv["excludes_zero"]:
                continue
            better = iv["value"] > 0
            n_seeds = iv.get("n_seeds", r["n_seeds"])
            flags.append({
                "method": r["method"],
                "mode": r["mode"],
                "fraction": r["fraction"],
                "against": against,
                "direction": "better" if better else "worse",
                "expected": None if r["mode"] == "harmful" else not better,
                "n_seeds": n_seeds,
                "provisional": n_seeds < MIN_SEEDS,
                "interval": dict(iv),
            })
    return flags
