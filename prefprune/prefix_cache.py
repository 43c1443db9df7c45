"""Adapt only the top transformer layers and memoise the frozen layers below them.

With LoRA on the top N layers only, the layers underneath never change during training, so their
output for a given token sequence is a constant: `PrefixCache` computes it once per distinct
sequence and every later forward (training epochs, retrains, scoring, evaluation) runs only the
adapted layers. The cached model's rewards and gradients equal the uncached model's up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["InstalledCache", "PrefixCache", "adapt_top_layers", "transformer_layers"]


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the longest nn.ModuleList of same-class modules."""
    best: nn.ModuleList | None = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")
    return best


def _transformer_body(model: nn.Module) -> nn.Module:
    """The bare transformer (e.g. BertModel, GPTNeoXModel) under peft and the classification head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "base_model", inner)


def adapt_top_layers(model: nn.Module, n_layers: int) -> list[str]:
    """Freeze the LoRA adapters of every transformer layer except the top `n_layers`.

    peft initialises LoRA B to zero, so a frozen adapter adds exactly B·A·x = 0: the lower layers
    behave as the pretrained model. The score head (and any other trainable module outside the
    layer list, such as BERT's pooler) stays trainable.

    Args:
        model: a reward model from `prefprune.model.build_reward_model`, before any training.
        n_layers: number of top layers that keep trainable adapters.

    Returns:
        Names of the parameters that were frozen.
    """
    layers = transformer_layers(model)
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"lora_layers must be in [1, {len(layers)}] for this model, got {n_layers}")
    frozen = []
    for i, layer in enumerate(layers[: len(layers) - n_layers]):
        for name, p in layer.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_B" in name and bool(p.detach().abs().max() > 0):
                raise ValueError(
                    f"layer {i} parameter {name!r} is a nonzero LoRA B: freezing it would not give "
                    "the pretrained layer; call adapt_top_layers before training"
                )
            p.requires_grad_(False)
            frozen.append(f"layer{i}.{name}")
    return frozen


class _PrefixRunner(nn.Module):
    """Stands in for the first transformer layer: returns the frozen prefix's output, from the cache."""

    def __init__(self, cache: PrefixCache, prefix: Sequence[nn.Module]):
        super().__init__()
        self._cache = cache
        # A tuple, not a ModuleList: model.train() must not reach these layers (they stay in eval mode).
        self._prefix = tuple(prefix)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self._cache.lookup(hidden_states, self._prefix, args, kwargs)


class _Skip(nn.Module):
    """Stands in for a frozen layer already applied by `_PrefixRunner`."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


class PrefixCache:
    """Memoise the output of a model's frozen lower transformer layers, per distinct input sequence.

    Installed on a reward model whose lower `n_prefix` layers have no trainable parameters (see
    `adapt_top_layers`), it replaces those layers by a lookup. The key of a sequence is its real
    tokens (attention mask 1) and their first position id; the value is the prefix output at those
    tokens. Padding positions are filled with zeros: they are masked out as attention keys and never
    pooled, so the rewards and gradients equal those of the uncached model up to rounding. A miss
    runs the real prefix layers (no gradient, eval mode) on the whole batch.

    One cache may serve several models that share the same frozen base (e.g. one per seed).

    Args:
        n_prefix: number of lower layers to cache.
    """

    def __init__(self, n_prefix: int):
        if n_prefix < 1:
            raise ValueError(f"n_prefix must be >= 1, got {n_prefix}")
        self.n_prefix = int(n_prefix)
        self._store: dict[tuple[int, bytes], Tensor] = {}
        self._batch: tuple[Tensor, Tensor | None, Tensor | None] | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())

    # -- installation --------------------------------------------------------------------------
    def install(self, model: nn.Module) -> InstalledCache:
        """Swap the model's lower layers for the cache; returns a handle whose `remove()` undoes it."""
        layers = transformer_layers(model)
        if self.n_prefix >= len(layers):
            raise ValueError(f"cannot cache {self.n_prefix} of {len(layers)} layers: at least one must run")
        prefix = list(layers[: self.n_prefix])
        for i, layer in enumerate(prefix):
            trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(
                    f"layer {i} has trainable parameters ({trainable[:3]}); only frozen layers can be "
                    "cached (use adapt_top_layers)"
                )
        body = _transformer_body(model)
        top = set()
        for layer in layers[self.n_prefix :]:
            top.update(id(m) for m in layer.modules())
        head_ids = set()
        for _, mod in model.named_modules():
            if any(p.requires_grad for p in mod.parameters(recurse=False)):
                head_ids.update(id(m) for m in mod.modules())
        # Dropout outside the adapted layers would make the memoised values random: switch it off.
        dropouts = [m for m in body.modules() if isinstance(m, nn.Dropout) and id(m) not in top]
        for layer in prefix:
            dropouts.extend(m for m in layer.modules() if isinstance(m, nn.Dropout))
        saved_p = [(m, m.p) for m in dropouts]
        for m, _ in saved_p:
            m.p = 0.0
        saved_training = [(layer, layer.training) for layer in prefix]
        for layer in prefix:
            layer.eval()
        hook = body.register_forward_pre_hook(self._remember_batch, with_kwargs=True)
        layers[0] = _PrefixRunner(self, prefix)
        for i in range(1, self.n_prefix):
            layers[i] = _Skip()
        return InstalledCache(layers, prefix, hook, saved_p, saved_training)

    def _remember_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("PrefixCache needs input_ids (inputs_embeds cannot be keyed)")
        self._batch = (ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))

    # -- lookup --------------------------------------------------------------------------------
    def _keys(self) -> tuple[list[tuple[int, bytes]], list[Tensor]]:
        assert self._batch is not None
        ids, mask, pos = self._batch
        keys, where = [], []
        for b in range(ids.shape[0]):
            real = (mask[b] != 0).nonzero().flatten() if mask is not None else torch.arange(ids.shape[1])
            first = int(real[0]) if real.numel() else 0
            start = int(pos[b, first]) if pos is not None and real.numel() else first
            keys.append((start, ids[b, real].cpu().numpy().astype(np.int64).tobytes()))
            where.append(real)
        return keys, where

    def lookup(self, hidden_states: Tensor, prefix: Sequence[nn.Module], args: tuple, kwargs: dict) -> Tensor:
        if self._batch is None or self._batch[0].shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError("PrefixCache: the layer input does not match the batch seen by the model body")
        keys, where = self._keys()
        if all(k in self._store for k in keys):
            self.hits += len(keys)
            out = hidden_states.new_zeros(hidden_states.shape)
            for b, (k, real) in enumerate(zip(keys, where, strict=True)):
                out[b, real] = self._store[k].to(device=out.device, dtype=out.dtype)
            return out
        self.misses += sum(k not in self._store for k in keys)
        with torch.no_grad():
            h = hidden_states
            for layer in prefix:
                h = layer(h, *args, **kwargs)
                h = h[0] if isinstance(h, tuple) else h
        h = h.detach()
        for b, (k, real) in enumerate(zip(keys, where, strict=True)):
            if k not in self._store:
                self._store[k] = h[b, real].clone()
        out = h.new_zeros(h.shape)
        for b, real in enumerate(where):
            out[b, real] = h[b, real]
        return out


@dataclass
class InstalledCache:
    layers: nn.ModuleList
    prefix: list[nn.Module]
    hook: Any
    saved_p: list[tuple[nn.Dropout, float]]
    saved_training: list[tuple[nn.Module, bool]]

    def remove(self) -> None:
        """Put the original layers, dropout rates and modes back."""
        for i, layer in enumerate(self.prefix):
            self.layers[i] = layer
        self.hook.remove()
        for m, p in self.saved_p:
            m.p = p
        for layer, mode in self.saved_training:
            layer.train(mode)
