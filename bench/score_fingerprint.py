"""SHA-256 of the score files of a fixed set of scoring runs on tiny seeded models (refactor guard).

Every run scores the same seeded tiny LoRA reward model (GPT-NeoX, float32 and float64) on seeded pairs
with one configuration of the engine (curvature × solver × sweep × extras) and prints, per run, the
SHA-256 of the score file, of the per-query file (when written) and of the sidecar with its timings
dropped. Two checkouts that print the same lines wrote byte-identical score files.

`score_fingerprint.before.txt` holds the digests of the engine before issue 20's refactor, and
`score_fingerprint.after.txt` after it: equal for every run but ``ggn_cg_fp64`` and
``ggn_multishift_relative_fp64``, the two that take Gauss–Newton products by CG, whose product now sums each
batch's gradient rows instead of an all-layer capture (columns equal to ≤ 2.4e-11 relative).

    PYTHONPATH=. python bench/score_fingerprint.py [--out DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import torch

from prefprune.model import LoRASettings, build_reward_model
from prefprune.score import ScoreConfig, score_pairs
from prefprune.testing import random_pairs, tiny_config, tiny_tokenizer

RUNS: dict[str, tuple[str, dict]] = {
    "ggn_direct_fp32": ("float32", {}),
    "ggn_direct_fp64_sweep_self_perquery": ("float64", {"damping": [0.1, 1.0], "self_influence": True,
                                                        "per_query": True, "per_query_tile": 2}),
    "ggn_cg_fp64": ("float64", {"solver": "cg", "tol": 1e-10, "max_iter": 200}),
    "ggn_multishift_relative_fp64": ("float64", {"solver": "multishift", "damping": [0.5, 2.0],
                                                 "damping_relative": True, "tol": 1e-10, "max_iter": 200}),
    "exact_cg_fp64": ("float64", {"curvature": "exact", "damping": 10.0, "tol": 1e-10, "max_iter": 200}),
    "exact_sweep_self_fp64": ("float64", {"curvature": "exact", "damping": [0.01, 10.0],
                                          "self_influence": True, "on_nonpositive": "nan", "tol": 1e-10,
                                          "max_iter": 200}),
    "projected_direct_fp32": ("float32", {"curvature": "projected_ggn", "projection_k": 4}),
    "projected_cg_fp64_self": ("float64", {"curvature": "projected_ggn", "projection_k": 4, "solver": "cg",
                                           "tol": 1e-10, "max_iter": 200, "self_influence": True}),
    "identity_fp32_self": ("float32", {"curvature": "identity", "self_influence": True}),
    "ggn_subsample_fp32": ("float32", {"hessian_samples": 7, "seed": 3, "batch_size": 3}),
}

_VOLATILE = {"timings_s", "seconds", "versions"}


def _model(dtype: str):
    cfg = tiny_config("gpt_neox", hidden_size=16, intermediate_size=32, num_attention_heads=2)
    model, _ = build_reward_model(cfg, lora=LoRASettings(r=2, alpha=2.0), dtype=getattr(torch, dtype), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B off zero, so every block has gradients
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(name: str, out: Path) -> dict[str, str]:
    dtype, settings = RUNS[name]
    train, val = random_pairs(13, seed=1, prefix="t"), random_pairs(4, seed=9, prefix="v")
    config = ScoreConfig(**{"batch_size": 4, "progress": False, **settings})
    result = score_pairs(_model(dtype), tiny_tokenizer(), train, val, config=config)
    path = out / f"{name}.parquet"
    result.save(path)
    sidecar = json.loads(Path(str(path) + ".json").read_text())
    found = {"scores": _sha(path.read_bytes()),
             "sidecar_sans_timings": _sha(json.dumps(_strip(sidecar), sort_keys=True).encode())}
    per_query = Path(str(path) + ".per_query.safetensors")
    if per_query.exists():
        # safetensors writes its metadata entries in a random order (a hash map), so the raw bytes differ
        # from run to run: hash the sorted metadata and the tensors instead.
        from safetensors import safe_open

        with safe_open(per_query, "np") as f:
            parts = [json.dumps(f.metadata(), sort_keys=True).encode()]
            parts += [k.encode() + f.get_tensor(k).tobytes() for k in sorted(f.keys())]
        found["per_query"] = _sha(b"".join(parts))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="Folder for the score files (default: temp).")
    parser.add_argument("--only", nargs="*", default=None, help="Run only these names.")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for name in args.only or RUNS:
            for what, digest in fingerprint(name, out).items():
                print(f"{name:40s} {what:22s} {digest}")


if __name__ == "__main__":
    main()
