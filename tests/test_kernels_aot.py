"""Compile every Triton kernel configuration the launchers can pick ahead of time for sm_90 (H100/H200),
without a GPU, and check the machine code that the GPU would run:

- ptxas (`-v`, sm_90a) reports no register spills for any configuration (fp32, fp16, bf16; every layer
  bucket of the fused dot; every projected-side combination of the projection; aligned and unaligned);
- in every configuration whose inputs the launcher found 16-byte aligned, the main token loads are 128-bit:
  `cp.async` of 16 bytes or `ld.global(.nc).v4`, and no 4-byte `cp.async` or scalar load of the inputs
  remains. (Before the launchers made contiguity and alignment known to the compiler, none of the 15
  configurations then checked had a single 128-bit load: every load was 4 bytes or 2 bytes wide.)

The interpreter cannot catch GPU-only compile errors (layouts, dot shapes, pointer casts); this can. It runs
in a subprocess because the tests' conftest turns Triton's interpreter on for this process; compiles are
spread over the CPUs and land in Triton's on-disk cache, so a second run takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prefprune.ops.segment import HAS_TRITON

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")]

_SCRIPT = r"""
import hashlib, json, os, re, subprocess, sys
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from prefprune.kernels import grad_dot, project

VARIANTS = grad_dot.aot_variants() + project.aot_variants()
WIDE = re.compile(
    r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x10[,;]|ld\.global(?:\.nc)?(?:\.[a-z0-9_:]+)*\.v4\."
)
NARROW_ASYNC = re.compile(r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x4[,;]")
SCALAR_16 = re.compile(r"ld\.global(?:\.nc)?(?:\.[a-z0-9_:]+)*\.b16 ")


def one(i):
    v = VARIANTS[i]
    fn, consts = v["kernel"], v["constexprs"]
    full = dict(v["signature"])
    full.update({key: "constexpr" for key in consts})
    # The JIT's specialisation of 16-divisible arguments (what a launch on aligned tensors compiles to).
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in v["divisible"]}
    src = ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": v["num_warps"]})
    ptx = k.asm["ptx"]
    cache = Path(os.environ["PREFPRUNE_AOT_CACHE"]) / (hashlib.sha256(ptx.encode()).hexdigest() + ".txt")
    if cache.exists():  # ptxas's report of this exact PTX, from an earlier run
        return summarise(v, ptx, cache.read_text())
    ptxas = get_ptxas(90)
    ptxas = getattr(ptxas, "path", ptxas)
    res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", "-", "-o", os.devnull], input=ptx,
                         capture_output=True, text=True, check=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(res.stderr)
    return summarise(v, ptx, res.stderr)


def summarise(v, ptx, report):
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", report))
    return {"name": v["name"], "aligned": v["aligned"], "spill_bytes": spill,
            "wide_loads": len(WIDE.findall(ptx)), "narrow_async": len(NARROW_ASYNC.findall(ptx)),
            "scalar16_loads": len(SCALAR_16.findall(ptx))}


if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        rows = list(pool.map(one, range(len(VARIANTS))))
    print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    script = tmp_path_factory.mktemp("aot") / "aot_compile.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # Triton caches the compiled kernels on disk; this caches ptxas's reports next to them.
    home_cache = os.path.join(os.path.expanduser("~"), ".triton", "cache")
    cache_root = os.environ.get("TRITON_CACHE_DIR") or home_cache
    env.setdefault("PREFPRUNE_AOT_CACHE", os.path.join(cache_root, "prefprune-ptxas"))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"AOT compile for sm_90 failed:\n{res.stderr[-4000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_every_launcher_configuration_compiles_for_sm90(compiled):
    from prefprune.kernels import grad_dot, project

    names = {r["name"] for r in compiled}
    expected = {v["name"] for v in grad_dot.aot_variants() + project.aot_variants()}
    assert names == expected
    # 3 dtypes × 3 small-side buckets × 3 query modes × 2 alignments; 3 dtypes × 4 side combinations × 2.
    assert len(compiled) == 54 + 24


def test_no_register_spills_on_sm90(compiled):
    spilled = {r["name"]: r["spill_bytes"] for r in compiled if r["spill_bytes"]}
    assert not spilled, f"register spills (bytes) on sm_90a: {spilled}"


def test_aligned_configurations_use_128_bit_loads(compiled):
    aligned = [r for r in compiled if r["aligned"]]
    assert aligned
    narrow = {
        r["name"]: r for r in aligned if r["wide_loads"] == 0 or r["narrow_async"] or r["scalar16_loads"]
    }
    assert not narrow, f"aligned configurations with loads narrower than 128 bits: {narrow}"
    # The check can fail: unaligned configurations compile to narrow loads (the launcher falls back to them
    # for odd sizes, e.g. the score head's h+1 inputs).
    unaligned = [r for r in compiled if not r["aligned"]]
    assert all(r["wide_loads"] == 0 for r in unaligned), [r["name"] for r in unaligned if r["wide_loads"]]
