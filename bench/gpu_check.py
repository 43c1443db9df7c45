"""One prepared GPU check: build, check every native and Triton op against its reference, time, report.

Usage, from the repository root:
  python bench/gpu_check.py            # on a CUDA machine; finishes in < 8 minutes on one H200
  python bench/gpu_check.py --cpu      # its CPU half: the same checks on tiny sizes, Triton interpreted

Sections, each time-boxed (the whole run is budgeted by --budget, default 420 s):
  1. build: if `prefprune._C` is missing or was built without CUDA, build it in place with
     `setup.py build_ext --inplace` (PREFPRUNE_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST = the visible GPU's
     capability unless set, MAX_JOBS = the CPU count unless set). Nothing is downloaded.
  2. cg: `bench/_gpu_cg.py` — native CG (factored and callable, fp32/fp64) against torch.linalg.solve
     and cg_reference, then native against reference timings.
  3. triton: `bench/_gpu_triton.py` when present — its `checks(device)` rows.
Prints one table and, when $OUT is set, writes $OUT/gpu_check.json (rows, build log tail, versions).
Exit status 0 when every check that ran passed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--cpu", action="store_true", help="run the CPU half (tiny sizes, Triton interpreted)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all sections together")
    p.add_argument("--no-build", action="store_true", help="never build prefprune._C, use what is there")
    p.add_argument("--skip", action="append", default=[], choices=["cg", "triton"], help="skip a section")
    return p.parse_args(argv)


def _probe_native() -> tuple[bool, bool, str]:
    """(loads, has_cuda, message) of prefprune._C, probed in a child so a failed import is not cached."""
    code = "import torch, prefprune._C as C; print(int(C.WITH_CUDA)); print(C.build_info())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return False, False, (proc.stderr.strip().splitlines() or ["import failed"])[-1]
    lines = proc.stdout.strip().splitlines()
    return True, lines[0] == "1", lines[-1]


def build_native(*, timeout_s: float) -> dict:
    """Build prefprune._C with CUDA in place unless a CUDA build is already importable."""
    import torch

    info: dict = {"built": False}
    loads, has_cuda, msg = _probe_native()
    info["before"] = msg
    if loads and has_cuda:
        info["ok"] = True
        return info
    env = dict(os.environ, PREFPRUNE_FORCE_CUDA="1")
    if not env.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability(0)
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # one arch: the build stays about a minute
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    info.update(arch=env["TORCH_CUDA_ARCH_LIST"], max_jobs=env["MAX_JOBS"])
    t0 = time.perf_counter()
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, log = -1, f"build timed out after {timeout_s:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
    info["build_s"] = round(time.perf_counter() - t0, 1)
    info["rc"] = rc
    info["log_tail"] = "\n".join(str(log).splitlines()[-40:])
    info["built"] = rc == 0
    loads, has_cuda, msg = _probe_native()
    info["after"] = msg
    info["ok"] = loads and has_cuda
    return info


def _call_checks(module, device: str, *, small: bool, budget_s: float) -> list[dict]:
    """module.checks(device, ...) passing only the keyword options that module's checks accepts."""
    params = inspect.signature(module.checks).parameters
    kwargs = {key: val for key, val in (("small", small), ("budget_s", budget_s)) if key in params}
    return module.checks(device, **kwargs)


def _error_row(section: str, exc: BaseException) -> dict:
    return {
        "op": f"{section} section",
        "shape": "-",
        "dtype": "-",
        "impl": section,
        "ok": False,
        "error": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-2000:],
    }


def main(argv=None) -> int:
    args = _args(argv)
    if args.cpu:
        # Triton reads this when its kernels are defined, i.e. before bench/_gpu_triton.py is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path[:0] = [str(ROOT), str(BENCH)]
    import torch
    from _gpu_common import format_table, write_json

    t_start = time.perf_counter()

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible: run with --cpu for the CPU half", file=sys.stderr)
        return 2
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "mode": device,
        "sections": {},
    }
    rows: list[dict] = []

    if device == "cuda" and not args.no_build:
        t0 = time.perf_counter()
        build = build_native(timeout_s=max(60.0, min(300.0, left() - 150.0)))
        report["build"] = build
        report["sections"]["build"] = round(time.perf_counter() - t0, 1)
        print(
            f"[build] {build.get('after', build.get('before'))} ({report['sections']['build']} s)", flush=True
        )
        if not build["ok"]:
            print(build.get("log_tail", ""), flush=True)
            rows.append(
                {
                    "op": "build prefprune._C (CUDA)",
                    "shape": "-",
                    "dtype": "-",
                    "impl": "native",
                    "ok": False,
                    "error": build.get("log_tail", "") or build.get("after", ""),
                }
            )
    else:
        loads, has_cuda, msg = _probe_native()
        report["build"] = {"before": msg, "ok": loads, "built": False}
        print(f"[build] not building: {msg}", flush=True)

    # The CG section gets a fixed slice; Triton gets what is left (its kernels JIT-compile first).
    sections = [
        ("cg", "_gpu_cg", lambda: min(110.0, max(20.0, left() * 0.35))),
        ("triton", "_gpu_triton", lambda: max(20.0, left() - 30.0)),
    ]
    for name, module_name, budget in sections:
        if name in args.skip:
            continue
        if not (BENCH / f"{module_name}.py").exists():
            print(f"[{name}] bench/{module_name}.py not present: section skipped", flush=True)
            report["sections"][name] = "absent"
            continue
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
            got = _call_checks(module, device, small=args.cpu, budget_s=budget())
            for r in got:
                r.setdefault("impl", name)
            rows.extend(got)
        except Exception as exc:  # a broken section is reported as a failed row; the others still run
            rows.append(_error_row(name, exc))
            traceback.print_exc()
        report["sections"][name] = round(time.perf_counter() - t0, 1)
        print(f"[{name}] {len(rows)} rows so far ({report['sections'][name]} s)", flush=True)

    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    failed = [r for r in rows if r.get("ok") is False]
    report["ok"] = not failed and bool(rows)
    report["rows"] = rows
    print()
    print(f"prefprune GPU check on {report['device']} (torch {report['torch']}, CUDA {report['cuda']})")
    print(format_table(rows))
    print(
        f"\n{len(rows)} rows, {len(failed)} failed, "
        f"{sum(1 for r in rows if r.get('skipped'))} skipped, {report['elapsed_s']} s"
    )
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_check.json"
        write_json(path, report)
        print(f"wrote {path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
