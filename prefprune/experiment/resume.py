"""Which settings an experiment may change when it resumes its output folder (checked against config.json)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefprune.experiment.config import RESUME_CHANGEABLE, RESUME_FREE, RESUME_GROWS, ExperimentConfig
from prefprune.experiment.steps import read_json, write_json

logger = logging.getLogger(__name__)

__all__ = ["check_resume"]


def _effective(config: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(config)
    if out.get("helpful_fractions") is None:
        out["helpful_fractions"] = out.get("fractions")  # None means "the same as fractions"
    return out


def _config_changes(prev: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """(refused, allowed) differences of two configs as (name, old, new); sections' fields by dotted name."""
    prev, now = _effective(prev), _effective(now)
    refused: list[tuple] = []
    allowed: list[tuple] = []
    for key in sorted(set(prev) | set(now)):
        a, b = prev.get(key), now.get(key)
        if key in RESUME_FREE or a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    name = f"{key}.{sub}"
                    (allowed if name in RESUME_CHANGEABLE else refused).append((name, a.get(sub), b.get(sub)))
        elif key in RESUME_GROWS and isinstance(a, list) and isinstance(b, list) and all(x in b for x in a):
            allowed.append((key, a, b))
        else:
            refused.append((key, a, b))
    return refused, allowed


def check_resume(out: Path, cfg: ExperimentConfig) -> None:
    """Refuse to resume `out` with settings that change its baselines or finished steps, naming them.

    `score.damping` may change and `RESUME_GROWS` lists may gain entries: they add score columns and arms
    but change no baseline (config.json then holds the new settings)."""
    prev = read_json(out / "config.json")
    now = cfg.to_dict()
    if prev is None:
        write_json(out / "config.json", now)
        return
    refused, allowed = _config_changes(prev, now)
    if refused:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused[:5])
        raise ValueError(
            f"{out} holds an experiment with a different config ({shown}); use a new output folder "
            "or restore the old settings to resume (a resume may change score.damping and add entries to "
            f"{', '.join(RESUME_GROWS)}: the baselines stay)"
        )
    if allowed:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in allowed)
        logger.info("resuming %s with changed %s (baselines kept)", out, shown)
        write_json(out / "config.json", now)
