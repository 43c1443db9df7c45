"""Saving and loading reward models as standard peft folders, with checks that an adapter fits its base.

A saved folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (peft), the tokenizer,
``prefprune.json`` (how to rebuild the base) and, for a randomly initialised base, the base itself in
``<folder>/base``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from prefprune import __version__
from prefprune._io import atomic_folder
from prefprune.model.build import (
    _check_base_exists,
    _fix_pad_token,
    _quiet_loading,
    config_summary,
    resolve_backbone,
)
from prefprune.model.config import BACKBONE_PACKAGES
from prefprune.model.forward import trainable_linears

__all__ = [
    "BASE_SUBFOLDER",
    "CARRIED_SETTINGS",
    "META_FILE",
    "carry_settings",
    "load_reward_model",
    "recorded_settings",
    "save_reward_model",
]

logger = logging.getLogger(__name__)

META_FILE = "prefprune.json"
BASE_SUBFOLDER = "base"
_FORMAT_VERSION = 1


def _base_state_dict(peft_model: nn.Module) -> dict[str, Tensor]:
    """State dict of the frozen base as it was before peft wrapped it (adapters, trained copies dropped)."""
    out = {}
    for key, value in peft_model.get_base_model().state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts:
            continue
        parts = [p for p in parts if p not in ("base_layer", "original_module")]
        out[".".join(parts)] = value
    return out


def save_reward_model(
    model: nn.Module, tokenizer: Any, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None
) -> None:
    """Save a reward model built by :func:`build_reward_model` as a standard peft folder (see
    `_save_into`). Every file is written under a temporary sibling folder and moved into place whole,
    ``prefprune.json`` last, so a crash never leaves a half-written weight file under its final name."""
    final = Path(path)
    with atomic_folder(final, last=(META_FILE,)) as tmp:
        _save_into(model, tokenizer, tmp, extra=extra, final=final)


def _save_into(
    model: nn.Module, tokenizer: Any, path: Path, *, extra: Mapping[str, Any] | None, final: Path
) -> None:
    """Save a reward model built by :func:`build_reward_model` as a standard peft folder.

    Writes ``adapter_config.json``, ``adapter_model.safetensors``, the tokenizer (when given),
    ``prefprune.json`` (base reference, base architecture, LoRA settings, ``extra``) and, for a
    randomly initialised base, the base model in ``<path>/base``.

    Args:
        model: A ``PeftModel`` reward model.
        tokenizer: Its tokenizer, or ``None``.
        path: Output folder (created).
        extra: JSON-serialisable values recorded under ``"extra"`` in ``prefprune.json``.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"save_reward_model needs a peft reward model (from build_reward_model), "
            f"got {type(model).__name__}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    info = dict(getattr(model, "prefprune_info", None) or {})
    peft_config = model.peft_config[model.active_adapter]
    inner = model.get_base_model()
    base_ref = info.get("base", peft_config.base_model_name_or_path)
    if base_ref is None:
        # Randomly initialised base: nothing else can rebuild it, so it travels with the adapter.
        base_dir = path / BASE_SUBFOLDER
        with _quiet_loading():
            fresh = AutoModelForSequenceClassification.from_config(inner.config, dtype=inner.dtype)
            fresh.load_state_dict(_base_state_dict(model), strict=True)
            fresh.save_pretrained(base_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(base_dir)
        stored_base, adapter_base = BASE_SUBFOLDER, str((path / BASE_SUBFOLDER).resolve())
    elif str(base_ref) in BACKBONE_PACKAGES:
        # Keep the alias: the package folder differs from machine to machine.
        stored_base, adapter_base = str(base_ref), resolve_backbone(base_ref)
    else:
        local = Path(base_ref).expanduser()
        stored_base = adapter_base = str(local.resolve()) if local.is_dir() else str(base_ref)
    old = peft_config.base_model_name_or_path
    peft_config.base_model_name_or_path = adapter_base
    try:
        model.save_pretrained(path)
    finally:
        peft_config.base_model_name_or_path = old
    if stored_base == BASE_SUBFOLDER:
        # The adapter names the base by the folder it will have, not the temporary one it was written to
        # (peft reads the base's config while saving, so the temporary one was named until now).
        adapter_base = str((final / BASE_SUBFOLDER).resolve())
    _tidy_adapter_config(path / "adapter_config.json", inner, adapter_base)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    meta = {
        "format": _FORMAT_VERSION,
        "base": stored_base,
        "base_config": config_summary(inner.config),
        "num_labels": 1,
        "pad_token_id": inner.config.pad_token_id,
        "dtype": str(inner.dtype).replace("torch.", ""),
        "lora": info.get("lora"),
        "extra": dict(extra) if extra else {},
        "prefprune_version": __version__,
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def _tidy_adapter_config(file: Path, inner: nn.Module, base: str) -> None:
    """Rewrite peft's adapter_config.json with `base` and a ``modules_to_save`` list without repeats or
    names `inner` does not have.

    peft's sequence-classification wrapper adds every head name it knows ("classifier", "score",
    "pre_classifier") to the list, again on each load, so a re-saved model lists them twice and names
    heads the model lacks; plain peft loading works either way, but the file should say what is trained.
    """
    cfg = json.loads(file.read_text())
    names = [n for n, _ in inner.named_modules()]
    listed = dict.fromkeys(cfg.get("modules_to_save") or [])
    cfg["modules_to_save"] = [m for m in listed if any(n == m or n.endswith("." + m) for n in names)] or None
    cfg["base_model_name_or_path"] = base
    file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def _adapter_shapes(path: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            return weights, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise _pickle_refused(legacy) from None
        return legacy, {k: tuple(v.shape) for k, v in state.items()}
    raise FileNotFoundError(f"not a reward model: no adapter_model.safetensors in {path}")


def _pickle_refused(where: Path) -> ValueError:
    """The error for pickled weights that hold more than tensors (loading them could run code)."""
    files = [where] if where.is_file() else sorted(
        f for f in where.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    named = ", ".join(str(f) for f in files) or f"a pickled weight file in {where}"
    return ValueError(
        f"{named}: pickled weights holding more than tensors are refused (unpickling them can run code). "
        "Convert the file to safetensors where you trust its source (transformers and peft: "
        "save_pretrained(folder, safe_serialization=True) writes model.safetensors / "
        "adapter_model.safetensors) and load that folder instead"
    )


def _rank_of(adapter_cfg: Mapping[str, Any], module: str) -> int | None:
    """The LoRA rank adapter_config.json gives `module` (peft's rank_pattern matching), None if unsaid."""
    for pattern, r in (adapter_cfg.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return int(r)
    r = adapter_cfg.get("r")
    return int(r) if isinstance(r, int) else None


def _check_adapter_fits(
    path: Path, shapes: Mapping[str, tuple[int, ...]], base: nn.Module, base_src: str,
    adapter_cfg: Mapping[str, Any] | None = None,
) -> None:
    """Check every adapter tensor has a home of the right shape in the base model, and the rank that
    adapter_config.json gives it."""
    modules = dict(base.named_modules())
    prefix = "base_model.model."
    for key, shape in shapes.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        parts = name.split(".")
        lora_at = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
        mod_name = ".".join(parts[:lora_at] if lora_at is not None else parts[:-1])
        module = modules.get(mod_name)
        problem = None
        if module is None:
            problem = f"targets module {mod_name!r}, which the base does not have"
        elif lora_at is not None and isinstance(module, nn.Linear):
            kind = parts[lora_at]
            if kind == "lora_A" and shape[-1] != module.in_features:
                problem = f"{key} expects in_features {shape[-1]}, base {mod_name} has {module.in_features}"
            if kind == "lora_B" and shape[0] != module.out_features:
                problem = f"{key} expects out_features {shape[0]}, base {mod_name} has {module.out_features}"
            rank = shape[0] if kind == "lora_A" else shape[-1]
            want = _rank_of(adapter_cfg or {}, mod_name)
            if problem is None and kind in ("lora_A", "lora_B") and want is not None and rank != want:
                raise ValueError(
                    f"adapter in {path}: {key} has rank {rank}, but adapter_config.json gives {mod_name} "
                    f"r={want}: the weights file and the config come from different adapters; put the "
                    "adapter_config.json saved with these weights beside them"
                )
        elif lora_at is None:
            param = dict(module.named_parameters(recurse=False)).get(parts[-1])
            if param is not None and tuple(param.shape) != tuple(shape):
                problem = f"{key} has shape {tuple(shape)}, base {name} has {tuple(param.shape)}"
        if problem:
            raise ValueError(
                f"adapter in {path} does not fit base {base_src!r}: {problem} "
                "(adapter saved for another base model?)"
            )


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"reward model folder not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"reward model path is not a folder: {path}")


def _read_folder(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any], dict[str, Any]]:
    """(adapter tensor shapes, adapter_config.json, prefprune.json or {}) of a saved folder, checked."""
    _check_folder(path)
    adapter_cfg_file = path / "adapter_config.json"
    if not adapter_cfg_file.is_file():
        raise FileNotFoundError(
            f"not a reward model folder: no adapter_config.json in {path} (expected a folder written by "
            "save_reward_model / prefprune train)"
        )
    weights, shapes = _adapter_shapes(path)
    if not any(("score" in k.split(".") or "classifier" in k.split(".")) for k in shapes):
        raise ValueError(f"not a reward model: no score/classifier weights in {weights}")
    adapter_cfg = json.loads(adapter_cfg_file.read_text())
    meta_file = path / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return shapes, adapter_cfg, meta


def _base_source(
    path: Path, meta: Mapping[str, Any], adapter_cfg: Mapping[str, Any], base: str | os.PathLike | None
) -> str:
    """Where the base model of a saved folder is (the override, the stored base subfolder, or its id)."""
    if base is not None:
        base_src = resolve_backbone(base)
    else:
        stored = meta.get("base") or adapter_cfg.get("base_model_name_or_path")
        if not stored:
            raise ValueError(
                f"{path}: cannot tell the base model (no 'base' in {META_FILE}, none in adapter_config.json)"
            )
        base_src = str(path / stored) if stored == BASE_SUBFOLDER else resolve_backbone(stored)
    _check_base_exists(base_src)
    return base_src


def _base_config(path: Path, meta: Mapping[str, Any], base_src: str) -> Any:
    """The base's config, checked against the architecture the adapter was saved for."""
    config = AutoConfig.from_pretrained(base_src, num_labels=1)
    expected = meta.get("base_config")
    if expected:
        found = config_summary(config)
        diff = [k for k, v in expected.items() if v is not None and found.get(k) != v]
        if diff:
            what = ", ".join(f"{k}: adapter {expected[k]!r} vs base {found.get(k)!r}" for k in diff)
            raise ValueError(
                f"adapter in {path} was saved for base {meta.get('base')!r} but {base_src!r} differs ({what})"
            )
    if meta.get("pad_token_id") is not None:
        config.pad_token_id = meta["pad_token_id"]
    return config


def load_reward_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    base: str | os.PathLike | None = None,
) -> tuple[nn.Module, Any]:
    """Load a reward model saved by :func:`save_reward_model` (or any peft SEQ_CLS adapter folder).

    Args:
        path: The saved folder.
        dtype: Parameter dtype; default the one it was saved with.
        device: Where to put the model; default CPU.
        base: Override the base model (hub id or folder); it must be the architecture the adapter was
            trained on.

    Returns:
        ``(model, tokenizer)``: the ``PeftModel`` in eval mode with LoRA and head parameters trainable
        (gradients are needed for scoring and retraining), and its tokenizer.

    Raises:
        FileNotFoundError: Missing folder, adapter or base.
        ValueError: Not a reward model (no score/classifier weights), or the adapter belongs to another base.
    """
    path = Path(path)
    shapes, adapter_cfg, meta = _read_folder(path)
    base_src = _base_source(path, meta, adapter_cfg, base)
    config = _base_config(path, meta, base_src)

    if dtype is None:
        dtype = getattr(torch, meta.get("dtype", "float32"))
    with _quiet_loading():
        try:
            model = AutoModelForSequenceClassification.from_pretrained(base_src, config=config, dtype=dtype)
        except pickle.UnpicklingError:
            raise _pickle_refused(Path(base_src)) from None
        _check_adapter_fits(path, shapes, model, base_src, adapter_cfg)
        model = PeftModel.from_pretrained(model, path, is_trainable=True)

    tokenizer = None
    if _has_tokenizer(path):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    elif not Path(base_src).is_dir() or _has_tokenizer(Path(base_src)):
        tokenizer = AutoTokenizer.from_pretrained(base_src)
    if tokenizer is not None:
        _fix_pad_token(model.get_base_model().config, tokenizer)
    model.prefprune_info = {
        "base": meta.get("base", adapter_cfg.get("base_model_name_or_path")),
        "base_config": config_summary(config),
        "lora": meta.get("lora"),
        "dtype": str(dtype).replace("torch.", ""),
        "loaded_from": str(path),
    }
    if meta.get("base") == BASE_SUBFOLDER and base is None:
        model.prefprune_info["base"] = None  # re-saving writes the random-init base again
    trainable_linears(model)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def training_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` record `save_reward_model` stored in a model folder (training settings, data
    provenance); empty when the folder has none."""
    meta_file = Path(path) / META_FILE
    return json.loads(meta_file.read_text()).get("extra", {}) if meta_file.is_file() else {}


def max_length_of(path: str | os.PathLike, default: int = 512) -> int:
    """The ``max_length`` a saved reward model was trained with (`default` when not recorded)."""
    return int(recorded_settings(path).get("max_length", (default, ""))[0])


#: The settings a saved folder records that a command loading it takes over unless given explicitly: the
#: sequence length and prompt truncation it was trained with, its tokenizer's padding side, its dtype.
CARRIED_SETTINGS = ("max_length", "truncation", "padding_side", "dtype")
_TOKENIZER_CONFIG = "tokenizer_config.json"


def recorded_settings(path: str | os.PathLike) -> dict[str, tuple[Any, str]]:
    """The `CARRIED_SETTINGS` a saved model folder records: name → (value, where it is recorded).

    ``max_length`` and ``truncation`` come from the training settings in ``prefprune.json`` (``prefprune
    train`` writes them), ``dtype`` from ``prefprune.json``, ``padding_side`` from the saved tokenizer's
    ``tokenizer_config.json``. A setting the folder does not record is absent.

    Raises:
        FileNotFoundError, NotADirectoryError: `path` is not a folder.
    """
    path = Path(path)
    _check_folder(path)
    meta_file, tok_file = path / META_FILE, path / _TOKENIZER_CONFIG
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    train_config = (meta.get("extra") or {}).get("train_config") or {}
    found: dict[str, tuple[Any, str]] = {}
    for name in ("max_length", "truncation"):
        if train_config.get(name) is not None:
            found[name] = (train_config[name], f"{META_FILE} extra.train_config.{name}")
    side = json.loads(tok_file.read_text()).get("padding_side") if tok_file.is_file() else None
    if side in ("left", "right"):
        found["padding_side"] = (side, f"{_TOKENIZER_CONFIG} padding_side")
    if meta.get("dtype"):
        found["dtype"] = (meta["dtype"], f"{META_FILE} dtype")
    return found


def carry_settings(
    path: str | os.PathLike, given: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each setting of `given` as a command loading the model folder `path` should use it, and from where.

    Args:
        path: A saved model folder.
        given: name → the value given explicitly (a flag, a config), or ``None`` when not given.
        defaults: name → the value to use when neither `given` nor the folder has one.

    Returns:
        name → ``{"value": ..., "from": "given" | "<file> <key>" | "default"}`` (what a sidecar records,
        "<file>" inside `path`);
        the choices are also logged in one INFO line.
    """
    recorded = recorded_settings(path)
    out: dict[str, dict[str, Any]] = {}
    for name, value in given.items():
        if value is not None:
            out[name] = {"value": value, "from": "given"}
        elif name in recorded:
            out[name] = {"value": recorded[name][0], "from": recorded[name][1]}
        else:
            out[name] = {"value": defaults.get(name), "from": "default"}
    logger.info("settings for model %s: %s", path, ", ".join(
        f"{name}={entry['value']} ({entry['from']})" for name, entry in out.items()))
    return out
