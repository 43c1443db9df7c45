"""Row format, error metric, timing, roofline, table and JSON output shared by the GPU checks and benchmarks.

A row: op, shape, dtype, impl, max_rel_err, tol, ok, ms_fast (the fast path alone), ms_ref, speedup, gbps,
tflops, bytes, flops, roofline_ms, bound, roofline_frac, plus check-specific keys (ms_op: the public op;
speedup_op; meets_target). Ceilings (vendor datasheets, SXM parts): HBM
4.8 TB/s (H200) / 3.35 TB/s (H100); dense bf16/fp16 tensor core 989 TFLOP/s; tf32 494 TFLOP/s; fp32 without
tensor cores and fp64 tensor core 67 TFLOP/s.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (bandwidth B/s, {precision: flop/s}) by device-name substring.
_RATES = {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12, "fp64": 67e12}
CEILINGS = {"H200": (4.8e12, _RATES), "H100": (3.35e12, _RATES)}


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU's model name with its core count and torch's thread count."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cpus, torch threads {torch.get_num_threads()})"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖₂ / ‖b‖₂ in float64 (‖a‖₂ when b = 0): the one error metric of every check and benchmark.

    NaN or Inf anywhere in `a` gives inf, so a non-finite result never passes a tolerance.
    """
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise ValueError(f"rel_err: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if not bool(torch.isfinite(a).all()):
        return math.inf
    den = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / (den if den > 0 else 1.0)


def roofline_ms(device: str, nbytes: int, flops: int, precision: str) -> tuple[float | None, str | None]:
    """Lower bound on the time from the device's ceilings, and which one binds (None off H100/H200)."""
    if not device.startswith("cuda"):
        return None, None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, (bw, rates) in CEILINGS.items():
        if key in name:
            t_mem, t_math = nbytes / bw, flops / rates[precision]
            return 1e3 * max(t_mem, t_math), ("memory" if t_mem >= t_math else "compute")
    return None, None


def bench_ms(fn: Callable[[], object], device: str, *, warmup_ms: float = 10.0, rep_ms: float = 60.0
             ) -> float:
    """Median time of fn in ms: on CUDA `triton.testing.do_bench` (CUDA events, the L2 flushed before every
    run, warm-up excluded); elsewhere (the dry run, where only the code path matters) one host-timed run
    after one warm-up."""
    if device.startswith("cuda"):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def time_ms(fn: Callable[[], object], device: str, *, budget_ms: float, max_reps: int) -> float:
    """Median wall time of fn in ms, synchronising the device around each call; the warm-up (JIT) excluded."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or 1e3 * (time.perf_counter() - start) < budget_ms):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def result_row(
    op: str,
    shape: str,
    dtype: torch.dtype,
    impl: str,
    err: float,
    tol: float,
    *,
    ok: bool | None = None,
    ms_fast: float | None = None,
    ms_ref: float | None = None,
    nbytes: int | None = None,
    flops: int | None = None,
    device: str = "",
    precision: str = "fp32",
    **extra: Any,
) -> dict:
    """One checked (and optionally timed) row; `ok` defaults to err <= tol with a finite err."""
    timed = bool(ms_fast) and nbytes is not None and flops is not None
    roof, bound = roofline_ms(device, nbytes, flops, precision) if timed else (None, None)
    return {
        "op": op,
        "shape": shape,
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "impl": impl,
        "max_rel_err": err,
        "tol": tol,
        "ok": bool(ok) if ok is not None else bool(math.isfinite(err) and err <= tol),
        "ms_fast": ms_fast,
        "ms_ref": ms_ref,
        "speedup": ms_ref / ms_fast if (ms_fast and ms_ref) else None,
        "gbps": nbytes / (ms_fast * 1e-3) / 1e9 if timed else None,
        "tflops": flops / (ms_fast * 1e-3) / 1e12 if timed else None,
        "bytes": nbytes,
        "flops": flops,
        "roofline_ms": roof,
        "bound": bound,
        "roofline_frac": roof / ms_fast if (roof and ms_fast) else None,
        **extra,
    }


def skipped_row(op: str, shape: str, dtype: torch.dtype, impl: str, why: str) -> dict:
    """A check that did not run, and why."""
    return {"op": op, "shape": shape, "dtype": DTYPE_NAMES.get(dtype, str(dtype)), "impl": impl, "ok": None,
            "skipped": why}


def _fmt(v, spec: str) -> str:
    """format(v, spec), or a dash right-aligned to the same width when v is None."""
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    """The one plain-text table of check rows (every section of gpu_check, the sections' own __main__)."""
    head = (
        f"{'':4} {'op':<34} {'impl':<7} {'dtype':<5} {'max_rel_err':>11} {'tol':>9} {'fast ms':>9} "
        f"{'op ms':>9} {'ref ms':>9} {'speedup':>7} {'GB/s':>7} {'TFLOP/s':>7} {'roof':>5} {'target':>6}"
        "  shape / note"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        op = f"{r['op']:<34} {r.get('impl', '-'):<7}"
        if r.get("skipped"):
            lines.append(f"SKIP {op} {r['dtype']:<5} {r['shape']} ({r['skipped']})")
            continue
        if r.get("error"):
            lines.append(f"FAIL {op} error: {r['error'].strip().splitlines()[-1]}")
            continue
        status = "ok  " if r.get("ok") else "FAIL"
        note = f" [{r['note']}]" if r.get("note") else ""
        err = f"{_fmt(r.get('max_rel_err'), '11.2e')} {_fmt(r.get('tol'), '9.1e')}"
        ms = " ".join(_fmt(r.get(key), "9.3f") for key in ("ms_fast", "ms_op", "ms_ref"))
        ms += f" {_fmt(r.get('speedup_op', r.get('speedup')), '7.2f')}"
        rate = " ".join(_fmt(r.get(key), spec) for key, spec in
                        (("gbps", "7.0f"), ("tflops", "7.3f"), ("roofline_frac", "5.2f")))
        met = r.get("meets_target")
        rate += f" {'-' if met is None else ('yes' if met else 'NO'):>6}"
        lines.append(f"{status} {op} {r['dtype']:<5} {err} {ms} {rate}  {r['shape']}{note}")
    return "\n".join(lines)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _jsonable(v.detach().cpu().tolist())
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def write_json(path: str | Path, obj: Any) -> Path:
    """The one JSON writer of bench/: strict JSON (NaN → null, ±inf → "inf"), indented, parent made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")
    return path
