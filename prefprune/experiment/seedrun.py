"""One seed of an experiment: its model (built lazily), its initial weights, and each retrain from them."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefprune import train as train_mod
from prefprune.experiment.config import ExperimentConfig
from prefprune.experiment.setup import build_seed_model
from prefprune.experiment.steps import load_state, save_state
from prefprune.prefix_cache import InstalledCache, PrefixCache

logger = logging.getLogger(__name__)

__all__ = ["SeedRun", "Timer", "load_trainable", "trainable_state"]


class Timer:
    """Wall time and this process's CPU time (all threads) of a block."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"saved state has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def _evaluate(
    model, tokenizer, data, cfg: ExperimentConfig, *, clean_ids: set[str] | None = None
) -> tuple[dict[str, Any], dict[str, float]]:
    """(test metrics, margin of every test pair); with `clean_ids`, the metrics also hold accuracy/loss on
    those pairs (from the same margins). The margins let the report bootstrap over test pairs."""
    out = dict(
        train_mod.evaluate(
            model,
            tokenizer,
            data,
            batch_size=cfg.eval_batch_size,
            max_length=cfg.max_length,
            return_margins=True,
        )
    )
    margins = out.pop("margins")
    if clean_ids is not None:
        m = torch.tensor([v for k, v in margins.items() if k in clean_ids], dtype=torch.float64)
        out["clean"] = {
            "accuracy": float((m > 0).double().mean()),
            "mean_margin": float(m.mean()),
            "loss": float(F.softplus(-m).mean()),
            "n": int(m.numel()),
        }
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}, margins


class SeedRun:
    """The model of one seed, built lazily (a fully finished seed never loads it), and its retrains."""

    def __init__(
        self, cfg: ExperimentConfig, seed: int, out: Path, cache: PrefixCache | None, test, clean_ids
    ):
        self.cfg, self.seed, self.out, self.cache = cfg, seed, out, cache
        self.test, self.clean_ids = test, clean_ids
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.installed: InstalledCache | None = None
        self.init_state: dict[str, Tensor] | None = None

    def ensure_model(self) -> tuple[nn.Module, Any]:
        if self.model is None:
            model, tok = build_seed_model(self.cfg, self.seed)
            model.to(train_mod.resolve_device(None if self.cfg.device == "auto" else self.cfg.device))
            if self.cache is not None:
                self.installed = self.cache.install(model)
            self.model, self.tokenizer = model, tok
            init_path = self.out / f"seed{self.seed}" / "init_state.pt"
            if init_path.is_file():
                # The initialisation this seed's finished steps started from (builds are seeded, so this
                # is the same values; loading it guards against library changes between invocations).
                load_trainable(model, load_state(init_path))
            else:
                save_state(trainable_state(model), init_path)
            self.init_state = trainable_state(model)
        return self.model, self.tokenizer

    def train_and_test(
        self, data, tag: str
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, float], Timer]:
        """Restore the seed's initial weights, train on `data`, evaluate on the test split.

        Returns:
            (training stats, test metrics, test margins by pair id, timer).
        """
        model, tok = self.ensure_model()
        load_trainable(model, self.init_state)
        config, ckpt = self.cfg.train_config(self.seed), None
        if config.checkpoint_every is not None or config.resume:
            # One checkpoint folder per training of the step; a rerun of the experiment resumes it (the
            # checkpoint refuses other data or settings) and a finished step removes it.
            ckpt = self.out / f"seed{self.seed}" / "checkpoints" / re.sub(r"[^\w.@-]+", "_", tag)
            config = dataclasses.replace(config, resume=True)
        with Timer() as tm:
            stats = train_mod.train_reward_model(model, tok, data, config=config, checkpoint_dir=ckpt)
            result, margins = _evaluate(model, tok, self.test, self.cfg, clean_ids=self.clean_ids)
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)
            with contextlib.suppress(OSError):  # the last one out removes checkpoints/ too
                ckpt.parent.rmdir()
        logger.info("seed %d %s: test accuracy %.4f (%.1fs)", self.seed, tag, result["accuracy"], tm.seconds)
        stats = {k: v for k, v in stats.items() if k != "history"} | {
            "final_step": (stats.get("history") or [{}])[-1]
        }
        return stats, result, margins, tm

    def close(self) -> None:
        if self.installed is not None:
            self.installed.remove()
        self.model = None
