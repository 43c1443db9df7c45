"""End-to-end GPU check: pass 2 of scoring against a training epoch on a Pythia-410m-shaped reward model.

A randomly initialised GPT-NeoX reward model with Pythia-410m's shape (hidden 1024, 24 layers, 16 heads,
MLP 4096, vocabulary 50,304; nothing is downloaded), LoRA r = 16 on query_key_value, scored through the
public API `prefprune.score.score_pairs` (curvature "identity": no solve, so the timed stage is pass 2:
one forward + backward per batch with the fused per-pair dots). The same encoded pairs, in the scorer's
batches, then train for one epoch (forward, backward, AdamW step on the LoRA parameters, autocast to the
same precision), the cost a user pays anyway and the lower bound DESIGN.md §3 names for pass 2.

Rows: pass 2 (s, tokens/s, peak memory) and the epoch, at fp32 and bf16 (`ScoreConfig.precision`; skipped
with the reason when this ScoreConfig has no such setting). `ok` means the run finished with finite scores.
`checks("cpu", small=True)` runs the same code on a tiny model (the dry run).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time

import torch
from _gpu_common import skipped_row

PYTHIA_410M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                   vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                   use_parallel_residual=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512,
            max_position_embeddings=512, rotary_pct=0.25, use_parallel_residual=True)


def _config(shape: dict):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**shape, num_labels=1, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         hidden_dropout=0.0, attention_dropout=0.0, use_cache=False,
                         tie_word_embeddings=False)


def _pairs(n: int, chars: int, seed: int = 0):
    from prefprune.data import PreferencePair

    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(rng.choice("etaoin shrdlu cmfwyp") for _ in range(k))

    # The test tokenizer is byte-level: one token per character.
    return [PreferencePair(id=f"e{i}", prompt=text(chars), chosen=text(chars // 2), rejected=text(chars // 2))
            for i in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def _row(op, shape, dtype_name, ok, seconds, tokens, peak, note, **extra):
    rate = f"{tokens / seconds:,.0f} tok/s" if seconds > 0 else "-"
    note = f"{rate}, peak {'-' if peak is None else f'{peak:,.0f} MiB'}, {note}"
    return {"op": op, "shape": shape, "dtype": dtype_name, "impl": "e2e", "ok": bool(ok), "max_rel_err": None,
            "tol": None, "ms_fast": 1e3 * seconds, "ms_ref": None, "speedup": None,
            "tokens_per_s": tokens / seconds if seconds > 0 else None, "peak_mb": peak,
            "note": note, **extra}


def _epoch(model, batches, device: str, dtype: torch.dtype) -> float:
    from prefprune.model import reward_forward, trainable_linears
    from prefprune.train import bradley_terry_loss

    params = [p for site in trainable_linears(model) for p in site.parameters()]
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    model.train()
    try:
        _sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            with autocast:
                rewards = reward_forward(model, batch)
            n = rewards.shape[0] // 2
            loss = bradley_terry_loss((rewards[:n] - rewards[n:]).float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0
    finally:
        model.eval()
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def _one_precision(model, tok, train, val, precision: str, device: str, shape_label: str) -> list[dict]:
    from prefprune.data import PairBatches, encode_pairs, length_order
    from prefprune.score import ScoreConfig, score_pairs

    fields = {f.name for f in dataclasses.fields(ScoreConfig)}
    if precision != "fp32" and "precision" not in fields:
        why = "this ScoreConfig has no precision setting: bf16 scoring cannot be asked for"
        return [skipped_row("pass 2 (score_pairs)", shape_label, torch.bfloat16, "e2e", why)]
    kwargs = dict(curvature="identity", batch_size=16, max_length=1024, progress=False)
    if "precision" in fields:
        kwargs["precision"] = precision
    config = ScoreConfig(**kwargs)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.startswith("cuda"):  # warm-up on a few pairs: Triton JIT, cuBLAS heuristics, allocator
        score_pairs(model, tok, train[:4], val[:2], config=config)
    _peak_reset(device)
    res = score_pairs(model, tok, train, val, config=config)
    peak = _peak_mb(device)
    t_pass2 = float(res.metadata["timings_s"]["pass2_scores"])
    enc = encode_pairs(train, tok, max_length=config.max_length)
    tokens = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in enc)
    finite = all(math.isfinite(float(v)) for v in res.columns["influence"])
    impl = res.metadata.get("impl", {}).get("segment_grad_dot")
    rows = [_row("pass 2 (score_pairs)", shape_label, precision, finite, t_pass2, tokens, peak,
                 f"segment_grad_dot={impl}", pairs=len(train))]
    grouped = [enc[i] for i in length_order(enc)]
    batches = PairBatches(grouped, batch_size=config.batch_size, pad_token_id=tok.pad_token_id, device=device)
    if device.startswith("cuda"):  # warm-up
        warm = PairBatches(grouped[:16], batch_size=16, pad_token_id=tok.pad_token_id, device=device)
        _epoch(model, warm, device, dtype)
    _peak_reset(device)
    t_epoch = _epoch(model, batches, device, dtype)
    rows.append(_row("train epoch (fwd+bwd+AdamW)", shape_label, precision, True, t_epoch, tokens,
                     _peak_mb(device), f"pass2/epoch = {t_pass2 / t_epoch:.2f} (target <= 1.3)",
                     pass2_over_epoch=t_pass2 / t_epoch))
    return rows


def checks(device: str, *, small: bool = False, budget_s: float = 150.0) -> list[dict]:
    """Rows for pass 2 and a training epoch at fp32 and bf16 (see the module docstring)."""
    from prefprune.model import LoRASettings, build_reward_model
    from prefprune.testing import tiny_tokenizer

    shape, n_train, chars = (TINY, 4, 30) if small else (PYTHIA_410M, 256, 340)
    label = (f"{'tiny' if small else 'pythia-410m-shaped'} random init, LoRA r16 qkv, {n_train} pairs "
             f"~{2 * chars} tokens/seq")
    start = time.perf_counter()
    model, _ = build_reward_model(_config(shape), lora=LoRASettings(r=16, alpha=32.0), seed=0)
    with torch.no_grad():  # LoRA B starts at zero; move it so that every LoRA layer carries gradient
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    model.to(device).eval()
    tok = tiny_tokenizer(model_max_length=2048)
    train, val = _pairs(n_train, chars), _pairs(2 if small else 16, chars, seed=1)
    rows: list[dict] = []
    for precision in ("fp32", "bf16"):
        if time.perf_counter() - start > budget_s:
            rows.append(skipped_row("pass 2 (score_pairs)", label, precision, "e2e", "time box reached"))
            continue
        try:
            rows.extend(_one_precision(model, tok, train, val, precision, device, label))
        except Exception as exc:  # one precision failing does not hide the other
            rows.append({"op": f"e2e {precision}", "shape": label, "dtype": precision, "impl": "e2e",
                         "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return rows
