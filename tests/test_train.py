"""Training loop: loss, schedule, accumulation, reproducibility, evaluation, failure modes (tiny models)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _pairs import easy_pairs

from prefprune.data import PreferenceDataset, PreferencePair, collate_pairs, encode_pairs
from prefprune.model import build_reward_model, load_reward_model, reward_forward
from prefprune.testing import tiny_config, tiny_tokenizer
from prefprune.train import (
    TrainConfig,
    bradley_terry_loss,
    evaluate,
    lr_factor,
    train_reward_model,
    write_metrics,
)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, lr=1e-2, max_length=48, progress=False, warmup_ratio=0.1)
    base.update(kw)
    return TrainConfig(**base)


def _tiny(family="gpt_neox", *, seed=0, dtype=torch.float32):
    return build_reward_model(tiny_config(family), tokenizer=tiny_tokenizer(), seed=seed, dtype=dtype)


def test_bradley_terry_loss_matches_float64_reference():
    m = torch.tensor([-800.0, -30.0, -1.5, 0.0, 0.25, 3.0, 40.0, 800.0], dtype=torch.float64)
    ref = torch.stack(
        [-torch.log(torch.sigmoid(x)) if abs(x) < 30 else torch.clamp(-x, min=0) for x in m]
    ).mean()
    got = bradley_terry_loss(m)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert bradley_terry_loss(torch.zeros(3)).item() == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match=r"non-empty 1-D tensor, got shape \(0,\)"):
        bradley_terry_loss(torch.zeros(0))


def test_lr_schedule_values():
    kw = dict(total_steps=10, warmup_steps=2)
    assert [lr_factor(s, schedule="linear", **kw) for s in range(4)] == [0.5, 1.0, 1.0, 0.875]
    assert lr_factor(9, schedule="linear", **kw) == pytest.approx(0.125)
    assert lr_factor(2, schedule="cosine", **kw) == 1.0
    assert lr_factor(6, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(9, schedule="constant", **kw) == 1.0
    assert lr_factor(0, total_steps=5, warmup_steps=0, schedule="linear") == 1.0


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "bert", "gpt2"])
def test_loss_decreases_on_easy_data(family):
    model, tok = _tiny(family)
    train, held = easy_pairs(64), easy_pairs(32, seed=1, prefix="h")
    before = evaluate(model, tok, held, max_length=48)
    metrics = train_reward_model(model, tok, train, config=_cfg(epochs=3), eval_data=held)
    after = metrics["eval"]
    assert after["loss"] < 0.6 * before["loss"], (before, after)
    assert after["accuracy"] >= 0.9, after
    assert metrics["steps"] == 3 * 8 and len(metrics["history"]) == 24
    assert metrics["n_train"] == 64 and metrics["n_skipped"] == 0
    first, last = metrics["history"][0]["loss"], metrics["history"][-1]["loss"]
    assert last < first, (first, last)
    assert not model.training


def test_step_gradient_is_mean_over_pairs_with_accumulation():
    """Accumulated step = step on the mean loss; the gradient checked against single-pair backwards."""
    data = easy_pairs(12)
    runs = {}
    for bs, acc in [(12, 1), (5, 3)]:  # 12 pairs as one batch, or micro-batches of 5, 5, 2
        model, tok = _tiny(dtype=torch.float64, seed=2)
        cfg = _cfg(epochs=1, batch_size=bs, grad_accum=acc, lr=1e-3, warmup_ratio=0.0, max_grad_norm=None)
        cfg.group_by_length = False
        train_reward_model(model, tok, data, config=cfg)
        runs[(bs, acc)] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, p in runs[(12, 1)].items():
        torch.testing.assert_close(runs[(5, 3)][name], p, rtol=0, atol=1e-12, msg=name)

    # The gradient itself: mean over pairs of single-pair gradients (no padding involved).
    model, tok = _tiny(dtype=torch.float64, seed=2)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # move off the B = 0 start so every LoRA factor has a gradient
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    enc = encode_pairs(data, tok, max_length=48)
    model.eval()
    batch = collate_pairs(enc, pad_token_id=tok.pad_token_id)
    r = reward_forward(model, batch)
    grads = torch.autograd.grad(bradley_terry_loss(r[:12] - r[12:]), params)
    single = [torch.zeros_like(p) for p in params]
    for e in enc:
        r1 = reward_forward(model, collate_pairs([e], pad_token_id=tok.pad_token_id))
        for acc_g, g in zip(single, torch.autograd.grad(F.softplus(-(r1[0] - r1[1])), params), strict=True):
            acc_g += g / len(enc)
    for g, s in zip(grads, single, strict=True):
        torch.testing.assert_close(g, s, rtol=1e-9, atol=1e-12)


def test_same_seed_same_metrics_bitwise():
    def run(seed):
        model, tok = _tiny("llama", seed=0)
        met = train_reward_model(
            model, tok, easy_pairs(40), config=_cfg(seed=seed, grad_accum=2), eval_data=easy_pairs(16, seed=3)
        )
        met.pop("wall_time_s")
        return met, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    torch.manual_seed(99)
    state = torch.get_rng_state()
    (m1, p1), (m2, p2), (m3, _) = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), state), "training changed the global RNG state"
    assert m1 == m2
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert m1["history"] != m3["history"]


def test_evaluate_matches_pair_by_pair_reference():
    model, tok = _tiny("gpt2", dtype=torch.float64, seed=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    data = easy_pairs(21, seed=5)
    got = evaluate(model, tok, data, batch_size=4, max_length=48, return_margins=True)
    model.eval()
    margins = {}
    with torch.no_grad():
        for e in encode_pairs(data, tok, max_length=48):
            r = reward_forward(model, collate_pairs([e], pad_token_id=tok.pad_token_id))
            margins[e.id] = (r[0] - r[1]).item()
    m = torch.tensor([margins[i] for i in data.ids], dtype=torch.float64)
    assert got["n"] == 21 and got["n_skipped"] == 0
    assert got["accuracy"] == pytest.approx((m > 0).double().mean().item(), abs=0)
    assert got["mean_margin"] == pytest.approx(m.mean().item(), rel=1e-9)
    assert got["loss"] == pytest.approx(F.softplus(-m).mean().item(), rel=1e-9)
    assert got["margins"] == pytest.approx(margins, rel=1e-9, abs=1e-12)
    assert 0.0 < got["accuracy"] < 1.0, got  # a random model: both outcomes occur


def test_too_long_pairs_are_skipped_and_counted_or_raise():
    model, tok = _tiny()
    long = PreferencePair(id="long1", prompt="Q:", chosen=" " + "x" * 100, rejected=" no")
    data = PreferenceDataset([*easy_pairs(10), long], schema="prompt_chosen_rejected", source="t")
    met = train_reward_model(model, tok, data, config=_cfg(epochs=1))
    assert met["n_train"] == 10 and met["n_skipped"] == 1 and met["skipped_ids"] == ["long1"]
    ev = evaluate(model, tok, data, max_length=48)
    assert ev["n"] == 10 and ev["skipped_ids"] == ["long1"]
    with pytest.raises(ValueError, match="long1"):
        train_reward_model(model, tok, data, config=_cfg(epochs=1, too_long="error"))


def test_nan_loss_is_a_clear_error():
    model, tok = _tiny()
    head = model.get_base_model().score.modules_to_save["default"]
    with torch.no_grad():
        head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at optimiser step 0 .*pair ids: \['e"):
        train_reward_model(model, tok, easy_pairs(16), config=_cfg(epochs=1))


def test_output_dir_saves_model_and_metrics(tmp_path):
    model, tok = _tiny("bert")
    held = easy_pairs(16, seed=7)
    met = train_reward_model(
        model, tok, easy_pairs(32), config=_cfg(epochs=1), eval_data=held, output_dir=tmp_path
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["eval"]["accuracy"] == met["eval"]["accuracy"] and saved["steps"] == met["steps"]
    assert saved["config"]["lr"] == 1e-2
    loaded, tok2 = load_reward_model(tmp_path)
    again = evaluate(loaded, tok2, held, max_length=48)
    assert again["accuracy"] == met["eval"]["accuracy"]
    assert again["loss"] == pytest.approx(met["eval"]["loss"], rel=1e-6)
    assert write_metrics(tmp_path / "other.json", {"a": 1}).read_text() == '{\n  "a": 1\n}\n'


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="schedule must be one of .* got 'step'"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="lr must be a positive finite number, got nan"):
        TrainConfig(lr=float("nan"))
    model, tok = _tiny()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
            train_reward_model(model, tok, easy_pairs(4), config=_cfg(device="cuda"))
    with pytest.raises(ValueError, match="no training pairs"):
        train_reward_model(model, tok, [], config=_cfg())
    with pytest.raises(ValueError, match="evaluate: no pairs"):
        evaluate(model, tok, [])
