"""The reward forward, the trainable linear sites a model's per-pair gradients live in, and attention switch.

Every trainable parameter of a prefprune reward model is the weight (or bias) of an ``nn.Linear``
(LoRA A/B, the score head, a BERT pooler); `trainable_linears` finds those layers and checks that they
cover every trainable parameter, so the per-example-gradient hooks of `prefprune.influence.capture` see
them all (DESIGN §3).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LinearSite", "eager_attention", "reward_forward", "trainable_linears"]

logger = logging.getLogger(__name__)


def reward_forward(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Rewards of a collated batch.

    Args:
        model: A reward model (one output logit).
        batch: ``input_ids`` and ``attention_mask``, both (2B, L) int64 (rows 0..B-1 chosen, B..2B-1
            rejected, as from ``prefprune.data.collate_pairs``); ``token_type_ids`` and ``position_ids``
            are passed on if present. Left-padded batches get ``position_ids`` counted from each row's
            first real token, so left and right padding give the same rewards.

    Returns:
        (2B,) rewards ``model(**batch).logits[:, 0]``.
    """
    mask = batch["attention_mask"]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": mask}
    if "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    elif mask.shape[1] > 0 and not bool(mask[:, 0].all()):
        # Left padding: without explicit positions the real tokens would start at position > 0, which
        # changes the reward of models with absolute position embeddings (GPT-2, BERT).
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(**kwargs).logits
    if logits.ndim != 2 or logits.shape[1] != 1:
        raise ValueError(
            f"reward model must output one logit per sequence, got logits of shape {tuple(logits.shape)}"
        )
    return logits[:, 0]


@dataclass(frozen=True)
class LinearSite:
    """A trainable `nn.Linear` whose per-pair gradients are captured.

    Attributes:
        name: module name in `model.named_modules()`.
        module: the layer.
    """

    name: str
    module: nn.Linear

    @property
    def has_bias(self) -> bool:
        """True when the layer has a trainable bias (an extra ones column in X)."""
        return self.module.bias is not None and self.module.bias.requires_grad

    @property
    def d_out(self) -> int:
        return int(self.module.weight.shape[0])

    @property
    def d_in(self) -> int:
        """Input width including the ones column of a trainable bias."""
        return int(self.module.weight.shape[1]) + int(self.has_bias)

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in

    def parameters(self) -> list[nn.Parameter]:
        """The layer's trainable parameters in flat-layout order (weight, then bias)."""
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def augmented(self, grads: Sequence[Tensor]) -> Tensor:
        """Stack (∇W, ∇b) given in `parameters()` order into the (d_out, d_in') matrix."""
        if self.has_bias:
            return torch.cat([grads[0], grads[1].unsqueeze(1)], dim=1)
        return grads[0]


def trainable_linears(model: nn.Module) -> list[LinearSite]:
    """The trainable linear layers of `model` (`named_modules` order), checked to cover every trainable one.

    Raises:
        ValueError: the model has no trainable parameters, or a trainable parameter is not the
            weight/bias of an `nn.Linear` (e.g. a DoRA magnitude vector: the per-pair gradient hooks
            could not see it), or a linear layer has a trainable bias but a frozen weight.
    """
    sites: list[LinearSite] = []
    covered: set[int] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w_train = mod.weight.requires_grad
        b_train = mod.bias is not None and mod.bias.requires_grad
        if b_train and not w_train:
            raise ValueError(f"linear layer {name!r} has a trainable bias but a frozen weight; unsupported")
        if w_train:
            site = LinearSite(name, mod)
            sites.append(site)
            covered.update(id(p) for p in site.parameters())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (expected LoRA adapters and a score head)")
    stray = [(n, p) for n, p in trainable if id(p) not in covered]
    if stray:
        owner = {id(p): type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False)}
        stray = [f"{n} ({owner[id(p)]})" for n, p in stray]
        raise ValueError(
            f"trainable parameters that are not nn.Linear weights/biases are not supported: {stray[:5]}"
            + (f" (+{len(stray) - 5} more)" if len(stray) > 5 else "")
        )
    return sites


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run `model` with eager attention inside the block (fused kernels cannot double-backward)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = before is not None and before != "eager" and hasattr(base, "set_attn_implementation")
    if switch:
        logger.debug("switching attention from %s to eager for double backward", before)
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            base.set_attn_implementation(before)
