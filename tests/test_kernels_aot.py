"""Compile the Triton segment kernels ahead of time for sm_90 (H100/H200) without a GPU, with the launchers'
own configurations, and check with ptxas that the 16-bit configurations the scorer uses do not spill.

The interpreter cannot catch GPU-only compile errors (layouts, dot shapes, pointer casts); this can. It runs
in a subprocess because the tests' conftest turns Triton's interpreter on for this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prefprune.ops.segment import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

_SCRIPT = r"""
import json, re, subprocess
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from prefprune.kernels import grad_dot, project


def compile_(fn, signature, constexprs, num_warps):
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def spills(kernel):
    ptxas = get_ptxas(90)
    ptxas = getattr(ptxas, "path", ptxas)
    res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", "-", "-o", "/dev/null"],
                         input=kernel.asm["ptx"], capture_output=True, text=True, check=True)
    return sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", res.stderr))


out = {}
dot_sig = {"meta_ptr": "*i64", "tiles_ptr": "*i64", "offsets_ptr": "*i64", "dots_ptr": "*fp32",
           "sq_ptr": "*fp32", "N": "i32", "m": "i32", "n_tiles": "i32"}
cfg = grad_dot.dot_launch_config(16, torch.bfloat16, interpret=False)  # LoRA r = 16, bf16 model
warps = cfg.pop("num_warps")
k = compile_(grad_dot._segment_grad_dot_kernel, dot_sig, {"DTYPE": tl.bfloat16, "HAS_Q": True, **cfg}, warps)
out["dot bf16 r16"] = spills(k)

proj_sig = {"x_ptr": "*bf16", "dy_ptr": "*bf16", "pin_ptr": "*fp32", "pout_ptr": "*fp32",
            "offsets_ptr": "*i64", "out_ptr": "*fp32"}
for name in ("N", "d_in", "d_out", "k_in", "k_out", "n_tiles", "n_tiles_in", "split"):
    proj_sig[name] = "i32"
for name in ("x_t", "x_d", "dy_t", "dy_d", "pin_k", "pin_d", "pout_k", "pout_d", "out_s", "out_n"):
    proj_sig["stride_" + name] = "i64"
for has_pin, has_pout, k_out in ((True, False, 16), (True, True, 64)):
    cfg = project.project_launch_config(k_out, 64, torch.bfloat16, interpret=False)
    warps = cfg.pop("num_warps")
    flags = {"HAS_PIN": has_pin, "HAS_POUT": has_pout}
    k = compile_(project._segment_project_kernel, proj_sig, {**flags, **cfg}, warps)
    out[f"project bf16 P_in={has_pin} P_out={has_pout}"] = spills(k)
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, f"AOT compile for sm_90 failed:\n{res.stderr[-4000:]}"
    spills = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(spills) == 3
    assert all(v == 0 for v in spills.values()), f"register spills (bytes) on sm_90a: {spills}"
