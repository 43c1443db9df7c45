"""Low-precision scoring (issue 10): bf16 on CPU against fp32, the setting, devices that cannot run it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _pairs import easy_pairs
from _scoring_helpers import make_pairs, tiny_model, tokenizer

from prefprune.model import LoRASettings, build_reward_model
from prefprune.precision import check_precision, resolve_precision
from prefprune.score import ScoreConfig, score_pairs
from prefprune.testing import tiny_config, tiny_tokenizer
from prefprune.train import TrainConfig, train_reward_model


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _lowest(x: np.ndarray, frac: float) -> set[int]:
    return set(np.argsort(x, kind="stable")[: max(1, round(frac * len(x)))].tolist())


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT-NeoX reward model trained for a few epochs on an easy task (float32)."""
    cfg = tiny_config("gpt_neox", hidden_size=32, intermediate_size=64)
    lora = LoRASettings(r=4, alpha=8.0)
    model, tok = build_reward_model(cfg, tokenizer=tiny_tokenizer(), seed=0, lora=lora)
    train = easy_pairs(100, seed=1)
    train_reward_model(model, tok, train, config=TrainConfig(epochs=3, batch_size=16, lr=5e-3, seed=0))
    return model, tok, train, easy_pairs(12, seed=2, prefix="v")


def test_bf16_scores_rank_like_fp32_on_a_trained_model(trained):
    model, tok, train, val = trained
    res = {}
    for prec in ("fp32", "bf16"):
        cfg = ScoreConfig(curvature="ggn", damping=1.0, precision=prec, batch_size=16, progress=False)
        res[prec] = score_pairs(model, tok, train, val, config=cfg)
    assert res["bf16"].metadata["precision"] == "bf16" and res["fp32"].metadata["precision"] == "fp32"
    report = {}
    for col in ("influence", "grad_dot"):
        a, b = res["fp32"].columns[col], res["bf16"].columns[col]
        rho = _spearman(a, b)
        overlap = len(_lowest(a, 0.1) & _lowest(b, 0.1)) / len(_lowest(a, 0.1))
        report[col] = (rho, overlap)
        assert rho >= 0.99, f"{col}: Spearman bf16 vs fp32 = {rho:.4f} < 0.99 ({report})"
        assert overlap >= 0.9, f"{col}: 10% lowest overlap bf16 vs fp32 = {overlap:.2f} < 0.9 ({report})"
    print(f"bf16 vs fp32 on the trained tiny model: {report}")


def test_precision_defaults_and_bad_values():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(None, cpu, torch.float32) == torch.float32
    assert resolve_precision(None, cpu, torch.float64) == torch.float64  # float64 models stay exact
    assert resolve_precision(None, cpu, torch.bfloat16) == torch.float32
    assert resolve_precision(None, cuda, torch.bfloat16) == torch.bfloat16
    assert resolve_precision("bf16", cpu, torch.float32) == torch.bfloat16
    with pytest.raises(ValueError, match="precision='fp32' is wider than the model's bf16 parameters"):
        resolve_precision("fp32", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="precision must be one of"):
        ScoreConfig(precision="int8").validate()


def test_unsupported_precision_fails_before_the_first_batch(monkeypatch):
    """A device without fp16 kernels: the error names the setting and the device; no batch ran."""
    import prefprune.precision as precision

    def no_fp16(device_type, dtype):
        raise RuntimeError(f'"addmm_impl_cpu_" not implemented for {dtype}')

    monkeypatch.setattr(precision.torch, "autocast", no_fp16)
    with pytest.raises(ValueError, match=r"precision='fp16' is not supported on cpu \(cpu\)"):
        check_precision(torch.float16, torch.device("cpu"))
    model = tiny_model("gpt_neox", dtype=torch.float32)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="precision='fp16' is not supported on cpu"):
        score_pairs(model, tokenizer(), make_pairs(4, seed=1), make_pairs(2, seed=2, prefix="v"),
                    config=ScoreConfig(curvature="identity", precision="fp16", progress=False))
    assert calls == [], "the error must come before the first forward"
