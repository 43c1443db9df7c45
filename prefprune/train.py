"""Reward-model training and evaluation: Bradley–Terry loss, AdamW with warm-up, seeded and reproducible.

The loss of a pair is ``softplus(-m)`` with ``m = r(prompt, chosen) - r(prompt, rejected)`` (DESIGN.md §2);
a batch is the mean over its pairs. Gradient accumulation weighs every pair of an optimiser step equally
(the accumulated gradient is the mean over all pairs of the step, whatever the micro-batch sizes).

Reproducibility: on CPU, one seed fixes the data order and every dropout mask, so two runs with the same
model, data and config give bitwise-identical weights and metrics. The caller's global RNG state is
restored afterwards. On CUDA, bf16 autocast (on by default there) and non-deterministic kernels make runs
close, not identical.

Sequences that cannot fit ``max_length`` even with the whole prompt cut (a response longer than the
limit) are skipped by default, counted and logged with their ids (``too_long="skip"``), or raise
(``too_long="error"``); the response itself is never truncated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefprune._io import atomic_write_text
from prefprune.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    training_fingerprint,
)
from prefprune.data import EncodedPair, PreferencePair, collate_pairs, encode_pairs
from prefprune.data.encode import too_long_message
from prefprune.model import reward_forward, save_reward_model

__all__ = [
    "TrainConfig",
    "bradley_terry_loss",
    "encode_for_training",
    "evaluate",
    "lr_factor",
    "resolve_device",
    "split_for_eval",
    "train_reward_model",
    "write_metrics",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
Schedule = Literal["linear", "cosine", "constant"]
Truncation = Literal["prompt", "error"]
TooLong = Literal["skip", "error"]
_SCHEDULES = typing.get_args(Schedule)
_TOO_LONG = (*typing.get_args(TooLong), "collect")  # "collect": skip without logging (the caller reports)
# How many skipped ids a log line quotes (the full list goes to the metrics).
_LOG_IDS = 5


@dataclass
class TrainConfig:
    """Training settings. Every field has a ``help`` entry (the CLI shows it)."""

    epochs: int = field(default=1, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=16, metadata={"help": "pairs per micro-batch (2x sequences)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate of AdamW"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps of linear warm-up from 0"})
    schedule: Schedule = field(default="linear", metadata={"help": "learning-rate decay after warm-up"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (matrices only, not biases)"}
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "clip the global gradient norm to this; None/0 = no clipping"}
    )
    max_length: int = field(default=512, metadata={"help": "max tokens per sequence (the prompt is cut)"})
    truncation: Truncation = field(
        default="prompt", metadata={"help": "prompt = cut the prompt when too long; error = raise"}
    )
    too_long: TooLong = field(
        default="skip", metadata={"help": "pairs whose response alone exceeds max_length: skip | error"}
    )
    seed: int = field(
        default=0,
        metadata={"help": "seed of data order and dropout (the CLI also seeds the LoRA/head initialisation "
                          "and the evaluation split with it)"},
    )
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on CPU)"})
    device: str | None = field(
        default=None, metadata={"help": "cuda | cpu | cuda:N; None = cuda if available"}
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "batch pairs of similar length (less padding; order still seeded-random)"},
    )
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimiser steps"})
    eval_batch_size: int = field(default=32, metadata={"help": "pairs per evaluation batch"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    checkpoint_every: int | None = field(
        default=None,
        metadata={"help": "save a resumable checkpoint (trainable weights, optimiser, scheduler, RNG states) "
                          "to OUTPUT/checkpoint.pt every N optimiser steps; needs an output folder"},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue from OUTPUT/checkpoint.pt when it exists; the final weights equal an "
                          "uninterrupted run's (on CPU bitwise); a changed setting or data is refused"},
    )

    def __post_init__(self) -> None:
        def positive(name: str, value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")

        for name in ("epochs", "batch_size", "grad_accum", "max_length", "eval_batch_size"):
            positive(name, getattr(self, name))
        if self.max_steps is not None:
            positive("max_steps", self.max_steps)
        if self.checkpoint_every is not None:
            positive("checkpoint_every", self.checkpoint_every)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive finite number, got {self.lr!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be >= 0 or None, got {self.max_grad_norm!r}")
        if self.truncation not in ("prompt", "error"):
            raise ValueError(f"TrainConfig.truncation must be 'prompt' or 'error', got {self.truncation!r}")
        if self.too_long not in _TOO_LONG:
            raise ValueError(f"TrainConfig.too_long must be one of {_TOO_LONG}, got {self.too_long!r}")

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Help text of every field, by name."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def bradley_terry_loss(margins: Tensor) -> Tensor:
    """Mean Bradley–Terry loss ``softplus(-m)`` = ``-log sigmoid(m)``.

    Args:
        margins: (B,) reward margins chosen − rejected.

    Returns:
        Scalar loss (softplus is the numerically stable form: no overflow for large |m|).
    """
    if margins.ndim != 1 or margins.numel() == 0:
        raise ValueError(f"margins must be a non-empty 1-D tensor, got shape {tuple(margins.shape)}")
    return F.softplus(-margins).mean()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return dev


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based).

    Linear warm-up reaches 1 at step ``warmup_steps - 1`` (the first step already gets a non-zero rate),
    then ``linear`` decays to 0 after the last step, ``cosine`` follows half a cosine, ``constant`` stays 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def encode_for_training(
    data: Sequence[PreferencePair],
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str = "prompt",
    too_long: str = "skip",
) -> tuple[list[EncodedPair], list[str]]:
    """Encode pairs with ``prefprune.data.encode_pairs``, skipping pairs that cannot fit.

    Args:
        data: Pairs.
        tokenizer: The model's tokenizer.
        max_length: Token limit per sequence.
        truncation: Passed to ``encode_pairs``.
        too_long: ``"skip"``: pairs that ``encode_pairs`` rejects are left out, logged and returned;
            ``"collect"``: the same without the log line (the caller reports them); ``"error"``: the first
            such pair raises.

    Returns:
        ``(encoded, skipped_ids)`` with ``encoded`` in data order.
    """
    if too_long not in _TOO_LONG:
        raise ValueError(f"too_long must be one of {_TOO_LONG}, got {too_long!r}")
    if too_long == "error":
        return encode_pairs(data, tokenizer, max_length=max_length, truncation=truncation), []
    try:
        return encode_pairs(data, tokenizer, max_length=max_length, truncation=truncation), []
    except ValueError:
        pass
    # Some pair does not fit: encode one by one to find which (rare, so the slower path is fine).
    encoded, skipped, reasons = [], [], []
    for pair in data:
        try:
            encoded.extend(encode_pairs([pair], tokenizer, max_length=max_length, truncation=truncation))
        except ValueError as err:
            skipped.append(pair.id)
            reasons.append(str(err))
    if skipped and too_long == "skip":
        logger.warning(
            "skipped %d of %d pairs that do not fit max_length=%d (ids %s%s); first reason: %s",
            len(skipped),
            len(data),
            max_length,
            ", ".join(skipped[:_LOG_IDS]),
            ", ..." if len(skipped) > _LOG_IDS else "",
            reasons[0],
        )
    return encoded, skipped


def _batches(
    encoded: Sequence[EncodedPair],
    *,
    batch_size: int,
    generator: torch.Generator | None,
    group_by_length: bool,
) -> list[list[int]]:
    """Index batches: seeded shuffle (or data order when ``generator`` is None), optionally length-grouped.

    Length grouping sorts windows of 50 batches by length and shuffles the resulting batches, so padding
    shrinks while every epoch's order stays random and seeded.
    """
    n = len(encoded)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    if group_by_length:
        window = 50 * batch_size
        lengths = [max(len(e.chosen_ids), len(e.rejected_ids)) for e in encoded]
        grouped = []
        for a in range(0, n, window):
            grouped.extend(sorted(order[a : a + window], key=lambda i: lengths[i]))
        order = grouped
    batches = [order[a : a + batch_size] for a in range(0, n, batch_size)]
    if group_by_length and generator is not None:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


def _to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError(
            "the tokenizer has no pad token; build the model with build_reward_model, which sets one"
        )
    return int(pad)


def _at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half-precision rewards for the loss; float64 stays float64 (reference runs)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def split_for_eval(
    data: Any, fraction: float, *, seed: int, held_out: Any | None = None
) -> tuple[Any, Any | None]:
    """(training pairs, held-out pairs or None): `held_out` when given (then all of `data` is trained on),
    else a `fraction` of `data` split off by pair id and `seed`; fraction 0 holds nothing out."""
    if held_out is not None:
        return data, _without_training_pairs(held_out, data)
    if fraction == 0:
        return data, None
    if not 0 < fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {fraction}")
    train, held = data.split([1 - fraction, fraction], seed=seed)
    return train, held


def _without_training_pairs(held: Any, train: Any) -> Any:
    """`held` less the pairs that are also in `train` (the same prompt and the same two responses, either
    way round): accuracy on a pair the model was trained on measures memory, not generalisation."""

    def key(p: PreferencePair) -> tuple:
        return p.prompt, frozenset((p.chosen, p.rejected))

    seen = {key(p) for p in train}
    both = [p.id for p in held if key(p) in seen]
    if not both:
        return held
    src, tsrc = getattr(held, "source", "") or "the evaluation data", getattr(train, "source", "") or "--data"
    if len(both) == len(held):
        raise ValueError(
            f"evaluation data {src!r}: all {len(held)} pairs are also in the training data {tsrc!r}; a "
            "held-out accuracy on them would measure memory, not generalisation. Give pairs that are not in "
            "--data, or leave out --eval-data to hold out --eval-fraction of --data"
        )
    logger.warning(
        "evaluation data %s: %d of its %d pairs are also in the training data %s and are left out of the "
        "held-out evaluation (e.g. %s)", src, len(both), len(held), tsrc, ", ".join(both[:_LOG_IDS])
    )
    if not hasattr(held, "exclude"):  # a plain sequence of pairs
        return [p for p in held if key(p) not in seen]
    kept = held.exclude(both)
    kept.stats["dropped_in_training_data"] = len(both)
    return kept


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: Any,
    data: Sequence[PreferencePair],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    truncation: str = "prompt",
    too_long: str = "skip",
    device: str | torch.device | None = None,
    bf16: bool = False,
    return_margins: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Pairwise accuracy and Bradley–Terry loss of a reward model on preference pairs.

    The model is put in eval mode for the pass and its previous mode restored afterwards.

    Args:
        model: Reward model.
        tokenizer: Its tokenizer.
        data: Pairs.
        batch_size: Pairs per forward pass (batches are formed by length, which does not change results
            beyond float rounding).
        max_length, truncation, too_long: As in :func:`encode_for_training`.
        device: Where to run; default the model's device.
        bf16: bf16 autocast (CUDA only).
        return_margins: Also return ``"margins"``: ``{pair_id: margin}``.
        progress: Show a tqdm bar.

    Returns:
        ``accuracy`` (fraction with margin > 0; ties count as wrong), ``mean_margin``, ``loss`` (mean
        softplus(−m)), ``n`` (pairs evaluated), ``n_skipped`` and ``skipped_ids`` (pairs that do not fit).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size (--batch-size) must be an integer >= 1, got {batch_size!r}")
    if len(data) == 0:
        raise ValueError("evaluate: no pairs to evaluate")
    encoded, skipped = encode_for_training(
        data, tokenizer, max_length=max_length, truncation=truncation, too_long=too_long
    )
    if not encoded:
        raise ValueError("evaluate: " + too_long_message("pairs", data, tokenizer, max_length))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    pad = _pad_id(tokenizer)
    side = getattr(tokenizer, "padding_side", "right")
    was_training = model.training
    model.eval()
    margins = torch.full((len(encoded),), math.nan, dtype=torch.float64)  # a pair never scored stays NaN
    try:
        batches = _batches(encoded, batch_size=batch_size, generator=None, group_by_length=True)
        for idx in tqdm(batches, desc="eval", disable=not progress, leave=False):
            batch = _to_device(
                collate_pairs([encoded[i] for i in idx], pad_token_id=pad, padding_side=side), dev
            )
            with _autocast(dev, bf16):
                rewards = _at_least_fp32(reward_forward(model, batch))
            b = len(idx)
            margins[idx] = (rewards[:b] - rewards[b:]).double().cpu()
    finally:
        model.train(was_training)
    if not torch.isfinite(margins).all():
        bad = [encoded[i].id for i in torch.nonzero(~torch.isfinite(margins)).flatten().tolist()[:_LOG_IDS]]
        raise FloatingPointError(f"evaluate: non-finite reward margins for pairs {bad}")
    out: dict[str, Any] = {
        "accuracy": float((margins > 0).double().mean()),
        "mean_margin": float(margins.mean()),
        "loss": float(F.softplus(-margins).mean()),
        "n": len(encoded),
        "n_skipped": len(skipped),
        "skipped_ids": skipped,
    }
    if return_margins:
        out["margins"] = {e.id: float(m) for e, m in zip(encoded, margins.tolist(), strict=True)}
    return out


def _step_windows(n_batches: int, grad_accum: int) -> Iterator[range]:
    for a in range(0, n_batches, grad_accum):
        yield range(a, min(n_batches, a + grad_accum))


def _total_steps(n_pairs: int, config: TrainConfig) -> int:
    """Optimiser steps of the whole run (epochs × steps per epoch, capped by max_steps)."""
    steps_per_epoch = math.ceil(math.ceil(n_pairs / config.batch_size) / config.grad_accum)
    total = steps_per_epoch * config.epochs
    return total if config.max_steps is None else min(total, config.max_steps)


def _optimizer(params: list[nn.Parameter], config: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW (no weight decay on vectors: biases, norms) and the warm-up + decay schedule."""
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=warmup_steps, schedule=config.schedule),
    )
    return optimizer, scheduler


@dataclass
class _Progress:
    """Where a run stands: what a checkpoint saves and the metrics report."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    epoch_loss: float = 0.0
    epoch_correct: float = 0.0
    epoch_n: float = 0.0


@dataclass
class _TrainRun:
    """One training run's fixed parts (model, data, optimiser, checkpoint) and its loop, in steps."""

    model: nn.Module
    tokenizer: Any
    encoded: list[EncodedPair]
    config: TrainConfig
    device: torch.device
    params: list[nn.Parameter]
    eval_data: Sequence[PreferencePair] | None
    ckpt_path: Path | None = None
    fingerprint: str | None = None
    resumed: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.total_steps = _total_steps(len(self.encoded), self.config)
        self.optimizer, self.scheduler = _optimizer(self.params, self.config, self.total_steps)
        self.clip = self.config.max_grad_norm if self.config.max_grad_norm else None
        self.use_bf16 = self.config.bf16 and self.device.type == "cuda"
        self.pad = _pad_id(self.tokenizer)
        self.side = getattr(self.tokenizer, "padding_side", "right")
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.progress = _Progress()

    def open_checkpoint(self, checkpoint_dir: str | os.PathLike | None) -> None:
        """Where checkpoints go, and the state to resume from (with `config.resume`)."""
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every and resume need an output folder (output_dir / --output)")
        self.ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        self.fingerprint = training_fingerprint(self.model, asdict(self.config), self.encoded)
        self.resumed = load_checkpoint(self.ckpt_path, self.fingerprint) if self.config.resume else None

    def run(self) -> None:
        """Every epoch (from the checkpoint's position when resuming), under the run's own RNG state."""
        start_epoch = start_window = 0
        if self.resumed is not None:
            restore_checkpoint(self.resumed, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler)
            pos = self.resumed["position"]
            self.progress.step, start_epoch, start_window = pos["step"], pos["epoch"], pos["window"]
            self.progress.history = list(pos["history"])
            self.progress.eval_history = list(pos["eval_history"])
            logger.info("resuming from %s at optimiser step %d (epoch %d)", self.ckpt_path,
                        self.progress.step, start_epoch)
        rng_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            # Dropout draws from the global generators: seed them so the run is reproducible.
            torch.manual_seed(self.config.seed)
            if self.resumed is not None:
                torch.set_rng_state(self.resumed["rng_cpu"])
                if rng_devices and self.resumed["rng_cuda"]:
                    torch.cuda.set_rng_state_all(self.resumed["rng_cuda"])
            self.bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="train", unit="step",
                            disable=not self.config.progress)
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            for epoch in range(start_epoch, self.config.epochs):
                if self.progress.step >= self.total_steps:
                    break
                resuming = self.resumed is not None and epoch == start_epoch
                self.epoch(epoch, start_window if resuming else 0, resuming)
            self.bar.close()
        self.model.eval()

    def epoch(self, epoch: int, start_window: int, resuming: bool) -> None:
        """One pass over the training pairs in this epoch's order, then the held-out evaluation."""
        prog = self.progress
        if resuming:
            self.generator.set_state(self.resumed["position"]["epoch_generator"])
        epoch_generator = self.generator.get_state()
        batches = _batches(self.encoded, batch_size=self.config.batch_size, generator=self.generator,
                           group_by_length=self.config.group_by_length)
        prog.epoch_loss = prog.epoch_correct = prog.epoch_n = 0.0
        if resuming:
            prog.epoch_loss, prog.epoch_correct, prog.epoch_n = self.resumed["position"]["epoch_sums"]
        for w_index, window in enumerate(_step_windows(len(batches), self.config.grad_accum)):
            if w_index < start_window:
                continue  # done before the checkpoint: same batches, same order
            if prog.step >= self.total_steps:
                break
            self.optimiser_step(batches, window, epoch)
            if self.config.checkpoint_every is not None and prog.step % self.config.checkpoint_every == 0:
                position = {"step": prog.step, "epoch": epoch, "window": w_index + 1,
                            "epoch_generator": epoch_generator, "history": prog.history,
                            "eval_history": prog.eval_history,
                            "epoch_sums": [prog.epoch_loss, prog.epoch_correct, prog.epoch_n]}
                save_checkpoint(self.ckpt_path, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler, fingerprint=self.fingerprint, position=position)
            self.bar.set_postfix(loss=f"{prog.epoch_loss / prog.epoch_n:.4f}",
                                 acc=f"{prog.epoch_correct / prog.epoch_n:.3f}")
        logger.info("epoch %d: train loss %.4f, accuracy %.4f over %d pairs", epoch,
                    prog.epoch_loss / max(prog.epoch_n, 1), prog.epoch_correct / max(prog.epoch_n, 1),
                    int(prog.epoch_n))
        if self.eval_data is not None and len(self.eval_data) > 0:
            self.evaluate(epoch)

    def optimiser_step(self, batches: list[list[int]], window: range, epoch: int) -> None:
        """The micro-batches of one optimiser step: forward, backward, clip, step; one history entry."""
        prog = self.progress
        n_window = sum(len(batches[k]) for k in window)
        w_loss = w_correct = 0.0
        for k in window:
            items = [self.encoded[i] for i in batches[k]]
            batch = collate_pairs(items, pad_token_id=self.pad, padding_side=self.side)
            batch = _to_device(batch, self.device)
            with _autocast(self.device, self.use_bf16):
                rewards = reward_forward(self.model, batch)
            b = len(items)
            rewards = _at_least_fp32(rewards)
            margins = rewards[:b] - rewards[b:]
            loss = bradley_terry_loss(margins)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at optimiser step {prog.step} (epoch {epoch}, "
                    f"micro-batch {k}); pair ids: {[e.id for e in items]}"
                )
            # Weight by the micro-batch's share of the step so the step's gradient is the
            # mean over all its pairs, even when the last micro-batch is short.
            (loss * (b / n_window)).backward()
            w_loss += loss.item() * b
            w_correct += (margins.detach() > 0).sum().item()
        clip = self.clip if self.clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if not torch.isfinite(grad_norm):
            ids = [self.encoded[i].id for k in window for i in batches[k]]
            raise FloatingPointError(
                f"non-finite gradient norm at optimiser step {prog.step} (epoch {epoch}); pair ids: {ids}"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        prog.epoch_loss += w_loss
        prog.epoch_correct += w_correct
        prog.epoch_n += n_window
        prog.history.append({"step": prog.step, "epoch": epoch, "loss": w_loss / n_window,
                             "accuracy": w_correct / n_window, "lr": lr, "grad_norm": float(grad_norm)})
        prog.step += 1
        self.bar.update(1)

    def evaluate(self, epoch: int) -> None:
        prog = self.progress
        cfg = self.config
        ev = evaluate(self.model, self.tokenizer, self.eval_data, batch_size=cfg.eval_batch_size,
                      max_length=cfg.max_length, truncation=cfg.truncation, too_long=cfg.too_long,
                      bf16=self.use_bf16)
        prog.eval_history.append({"epoch": epoch, "step": prog.step, **ev})
        logger.info("epoch %d: eval accuracy %.4f, loss %.4f (n=%d)", epoch, ev["accuracy"], ev["loss"],
                    ev["n"])
        self.bar.set_postfix(loss=f"{prog.epoch_loss / prog.epoch_n:.4f}",
                             acc=f"{prog.epoch_correct / prog.epoch_n:.3f}", eval_acc=f"{ev['accuracy']:.3f}")


def train_reward_model(
    model: nn.Module,
    tokenizer: Any,
    train: Sequence[PreferencePair],
    *,
    config: TrainConfig | None = None,
    eval_data: Sequence[PreferencePair] | None = None,
    output_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train the trainable parameters of a reward model with the Bradley–Terry loss.

    The model is trained in ``train()`` mode (the base's own dropout is active, seeded; LoRA dropout
    defaults to 0) and left in eval mode on ``config.device``.

    Args:
        model: Reward model from ``build_reward_model`` / ``load_reward_model``.
        tokenizer: Its tokenizer (pad token and padding side are taken from it).
        train: Training pairs.
        config: Settings; default ``TrainConfig()``.
        eval_data: Held-out pairs, evaluated after every epoch.
        output_dir: When given, the model is saved there (``save_reward_model``) with ``metrics.json``.
        checkpoint_dir: Where ``checkpoint.pt`` goes with ``config.checkpoint_every`` / ``config.resume``
            (default `output_dir`; the CLI saves the model itself, with its provenance, and gives this).

    Returns:
        Metrics: ``train_loss``/``train_accuracy`` (mean over the last epoch's pairs, as trained),
        ``eval`` (last evaluation or None), ``eval_history``, ``history`` (one entry per optimiser step:
        loss, accuracy, lr, grad_norm), ``steps``, ``n_train``, ``n_skipped``, ``wall_time_s``, ``device``,
        ``config``.

    Raises:
        FloatingPointError: A non-finite loss or gradient norm (names the step and the pair ids).
    """
    config = config if config is not None else TrainConfig()
    start = time.perf_counter()
    device = resolve_device(config.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (build it with build_reward_model)")
    if len(train) == 0:
        raise ValueError("no training pairs")
    encoded, skipped = encode_for_training(
        train, tokenizer, max_length=config.max_length, truncation=config.truncation, too_long=config.too_long
    )
    if not encoded:
        raise ValueError(too_long_message("training pairs", train, tokenizer, config.max_length))
    run = _TrainRun(model, tokenizer, encoded, config, device, params, eval_data)
    if config.checkpoint_every is not None or config.resume:
        run.open_checkpoint(checkpoint_dir if checkpoint_dir is not None else output_dir)
    run.run()
    prog = run.progress
    metrics: dict[str, Any] = {
        "train_loss": prog.epoch_loss / prog.epoch_n if prog.epoch_n else None,
        "train_accuracy": prog.epoch_correct / prog.epoch_n if prog.epoch_n else None,
        "eval": prog.eval_history[-1] if prog.eval_history else None,
        "eval_history": prog.eval_history,
        "steps": prog.step,
        "epochs": config.epochs,
        "n_train": len(encoded),
        "n_skipped": len(skipped),
        "skipped_ids": skipped,
        "n_trainable_params": sum(p.numel() for p in params),
        "device": str(device),
        "wall_time_s": time.perf_counter() - start,
        "config": asdict(config),
        "history": prog.history,
    }
    if output_dir is not None:
        save_reward_model(model, tokenizer, output_dir, extra={"train_config": asdict(config)})
        write_metrics(output_dir, metrics)
    return metrics


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write metrics as JSON; a folder gets ``metrics.json`` inside it. Returns the file written."""
    path = Path(path)
    target = path / METRICS_FILE if path.is_dir() or not path.suffix else path
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(metrics, indent=2, default=str) + "\n")
    return target
