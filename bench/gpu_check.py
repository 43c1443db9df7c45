"""One prepared GPU check: install, test, check every kernel and op against its reference, time, report.

Usage, from the repository root (or any directory):
  python bench/gpu_check.py             # on a CUDA machine; well under 8 minutes on one H200
  python bench/gpu_check.py --dry-run   # on CPU: the same install/import path, every section's CPU part, tiny
                                        # sizes (Triton interpreted), the same table and JSON

Sections, each in its own try block and time box (one failure never hides the others):
  install  `prefprune` (this tree, with `prefprune.kernels`) importable? If not, install it offline into a
           private prefix: `pip install --no-deps --no-build-isolation --no-index --prefix P -e <repo>`
           (on CUDA with PREFPRUNE_FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST = the GPU's capability, so the
           CUDA CG kernels are built; in the dry run PREFPRUNE_SKIP_EXT=1). The prefix's site directory is
           then added (`prefprune.kernels` is `kernels/`, through the link `prefprune/kernels`), here and
           in every child process.
           If the CUDA build fails it retries without the extension, so the Triton sections still run.
  pytest   the kernel and CG test files under pytest on the GPU (dry run: collected only).
  triton   `_gpu_triton.checks`: every kernel × dtype against float64 with an fp32-level tolerance,
           CUDA-event timings (do_bench, L2 flushed) of the kernel alone, the public op and the reference;
           GB/s, TFLOP/s, roofline_frac, meets_target.
  e2e      `_gpu_e2e.checks`: pass 2 of `score_pairs` against a training epoch on a random-init
           Pythia-410m-shaped reward model, tokens/s and peak memory, fp32 and bf16.
  cg       `_gpu_cg.checks`: native CG against linalg.solve and cg_reference (factored, callable, the m = 1
           large-k callable case of the scorer), timings.
Prints one table last; writes `$OUT/gpu_check.json` (or --json PATH): versions, per-section seconds and
logs, every row. Exit status 0 when every row that ran passed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
SECTIONS = ("install", "pytest", "triton", "e2e", "cg")
KERNEL_TESTS = [
    "tests/test_kernels.py",
    "tests/test_kernels_precision.py",
    "tests/test_kernels_gpucheck.py",
    "tests/test_dispatch.py",
    "tests/test_cg.py",
    "tests/test_cg_native_gpu_paths.py",
]
# Seconds per section (scaled down when --budget is smaller than their sum).
BUDGETS = {"install": 110.0, "pytest": 110.0, "triton": 90.0, "e2e": 80.0, "cg": 60.0}


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: install/import path, tiny sizes, same table")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all sections together")
    p.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="skip a section")
    p.add_argument("--json", default=None, help="JSON report path (default: $OUT/gpu_check.json)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------

_PROBE = (
    "import os, prefprune, prefprune.kernels, prefprune.ops.segment; "
    "print(os.path.realpath(os.path.dirname(prefprune.__file__)))"
)


# Source run first in this process and in every child once the tree is installed into a prefix: drop any
# other editable install of prefprune from the import system (its finder module has the same name as the
# new one, so the new .pth would just re-import it), then load the new finder from its file under a name
# of its own; it maps prefprune and prefprune.kernels to this tree.
_ACTIVATE = """\
import glob, importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, '__module__', '').startswith('__editable___prefprune_')]
_path = sorted(glob.glob({sitedir!r} + '/__editable___prefprune_*_finder.py'))[-1]
_spec = importlib.util.spec_from_file_location('_prefprune_gpu_check_finder', _path)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_mod.install()
"""


def activate(sitedir: str) -> None:
    """Use the prefprune installed into `sitedir` in this process (see _ACTIVATE)."""
    exec(_ACTIVATE.format(sitedir=sitedir), {})


def _boot(sitedir: str | None) -> str:
    """Python source for a child interpreter: the same activation first (nothing without a sitedir)."""
    return "" if not sitedir else _ACTIVATE.format(sitedir=sitedir)


def probe_import(sitedir: str | None) -> tuple[bool, str]:
    """Whether a fresh interpreter imports this tree's prefprune (and prefprune.kernels); why not."""
    proc = subprocess.run([sys.executable, "-c", _boot(sitedir) + _PROBE], cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        return False, (proc.stderr.strip().splitlines() or ["import failed"])[-1]
    where = proc.stdout.strip().splitlines()[-1]
    if Path(where) != (ROOT / "prefprune").resolve():
        return False, f"prefprune imports from {where}, not from this tree ({ROOT})"
    return True, f"prefprune from {where}"


def _prefix_sitedir(prefix: Path) -> str:
    scheme = "posix_prefix" if os.name == "posix" else None
    paths = sysconfig.get_paths(scheme=scheme, vars={"base": str(prefix), "platbase": str(prefix)})
    return paths["purelib"]


def install(*, dry_run: bool, timeout_s: float) -> dict:
    """Make this tree's prefprune importable (see the module docstring); returns the section's record."""
    info: dict = {}
    ok, why = probe_import(None)
    info["before"] = why
    if ok:
        info.update(ok=True, how="already importable")
        return info
    import torch

    digest = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    prefix = Path(tempfile.gettempdir()) / f"prefprune-gpu-check-{digest}"
    sitedir = _prefix_sitedir(prefix)
    cuda = torch.cuda.is_available() and not dry_run
    attempts = []
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or f"{major}.{minor}"  # one arch: a short build
        cuda_env = {"PREFPRUNE_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch}
        attempts.append(("with the CUDA extension", cuda_env))
    # The dry run never compiles C++ (minutes on a small CPU); on CUDA this is the fallback that keeps the
    # Triton sections alive when the extension does not build.
    attempts.append(("without the native extension", {"PREFPRUNE_SKIP_EXT": "1"}))
    deadline = time.perf_counter() + timeout_s
    for label, extra in attempts:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFPRUNE_")}
        env.update(extra, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                   MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
        # --ignore-installed: never uninstall a prefprune that this Python already has (pip would, even
        # with --prefix): the check must leave the environment it runs in as it found it.
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--ignore-installed", "--prefix", str(prefix), "-e", str(ROOT)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=max(30.0, deadline - time.perf_counter()))
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, log = -1, f"pip install timed out\n{exc.stdout or ''}{exc.stderr or ''}"
        attempts_rec = {"label": label, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                        "log_tail": "\n".join(str(log).splitlines()[-30:])}
        info.setdefault("attempts", []).append(attempts_rec)
        if rc == 0:
            ok, why = probe_import(sitedir)
            if ok:
                activate(sitedir)
                info.update(ok=True, how=f"installed into {prefix} {label}", sitedir=sitedir, after=why)
                return info
            attempts_rec["probe"] = why
    # Last resort: this tree on sys.path; prefprune.kernels is the link prefprune/kernels -> ../kernels, or,
    # where a copy lost the link, kernels/ registered as that namespace package by hand.
    sys.path.insert(0, str(ROOT))
    import prefprune

    if not (ROOT / "prefprune" / "kernels").is_dir():
        spec = importlib.machinery.ModuleSpec("prefprune.kernels", None, is_package=True)
        spec.submodule_search_locations = [str(ROOT / "kernels")]
        mod = importlib.util.module_from_spec(spec)
        sys.modules["prefprune.kernels"] = mod
        prefprune.kernels = mod
    info.update(ok=False, how="pip install failed: this tree on sys.path with kernels/ aliased (fallback)")
    return info


def install_row(info: dict) -> dict:
    row = {"op": "install prefprune (this tree)", "shape": "-", "dtype": "-", "impl": "install",
           "ok": bool(info.get("ok")), "note": info.get("how")}
    if not info.get("ok"):
        tails = [a.get("log_tail", "") for a in info.get("attempts", [])]
        row["error"] = (tails[-1] if tails else info.get("before", "")) or "install failed"
    return row


# ---------------------------------------------------------------------------------------------
# pytest
# ---------------------------------------------------------------------------------------------


def run_pytest(*, dry_run: bool, sitedir: str | None, timeout_s: float) -> list[dict]:
    files = [f for f in KERNEL_TESTS if (ROOT / f).exists()]
    args = ["-q", "-p", "no:cacheprovider", *(["--collect-only"] if dry_run else ["-x", "-rs"]), *files]
    code = _boot(sitedir) + f"import sys, pytest; sys.exit(pytest.main({args!r}))"
    env = dict(os.environ)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = -1, f"pytest timed out after {timeout_s:.0f} s\n{exc.stdout or ''}"
    lines = [ln for ln in str(out).splitlines() if ln.strip()]
    pattern = re.compile(r"\d+ (passed|failed|errors?|tests? collected)")
    summary = next((ln for ln in reversed(lines) if pattern.search(ln)), lines[-1] if lines else "no output")
    op = "pytest kernel+CG tests" + (" (collect)" if dry_run else "")
    row = {"op": op, "shape": f"{len(files)} files", "dtype": "-", "impl": "pytest", "ok": rc == 0,
           "note": summary.strip("= "), "seconds": round(time.perf_counter() - t0, 1),
           "log_tail": "\n".join(lines[-60:])}
    if rc != 0:
        row["error"] = "\n".join(lines[-30:]) or f"pytest exited {rc}"
    return [row]


# ---------------------------------------------------------------------------------------------
# sections on the check modules
# ---------------------------------------------------------------------------------------------


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
        "error": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:],
    }


def _cg_rows(device: str, *, small: bool, budget_s: float) -> list[dict]:
    from _gpu_common import skipped_row

    from prefprune import _ext

    mod = _ext.native()
    if mod is None or (device.startswith("cuda") and not getattr(mod, "WITH_CUDA", False)):
        why = _ext.native_error() or "prefprune._C was built without CUDA"
        return [skipped_row("cg section (native CG)", "-", "-", "native", f"native CG unavailable: {why}")]
    import _gpu_cg

    return _call_checks(_gpu_cg, device, small=small, budget_s=budget_s)


def main(argv=None) -> int:
    args = _args(argv)
    if args.dry_run:
        # Triton reads this when its kernels are defined, i.e. before any prefprune.kernels import.
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, str(BENCH))
    import torch
    from _gpu_common import format_table, write_json

    t_start = time.perf_counter()
    scale = min(1.0, args.budget / sum(BUDGETS.values()))
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible: run with --dry-run for the CPU part", file=sys.stderr)
        return 2
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "mode": "dry-run" if args.dry_run else "gpu",
        "root": str(ROOT),
        "sections": {},
    }
    rows: list[dict] = []
    sitedir = None

    def run_section(name: str, body) -> None:
        if name in args.skip:
            report["sections"][name] = "skipped (--skip)"
            return
        t0 = time.perf_counter()
        try:
            got = body(BUDGETS[name] * scale)
            for r in got:
                r.setdefault("impl", name)
                r["section"] = name
            rows.extend(got)
        except Exception as exc:  # a broken section is one failed row; the others still run
            rows.append({**_error_row(name, exc), "section": name})
            traceback.print_exc()
        report["sections"][name] = round(time.perf_counter() - t0, 1)
        print(f"[{name}] done in {report['sections'][name]} s ({len(rows)} rows so far)", flush=True)

    def do_install(budget):
        nonlocal sitedir
        info = install(dry_run=args.dry_run, timeout_s=budget)
        report["install"] = info
        sitedir = info.get("sitedir")
        return [install_row(info)]

    run_section("install", do_install)
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    run_section("pytest", lambda b: run_pytest(dry_run=args.dry_run, sitedir=sitedir, timeout_s=b))

    def module_section(module_name):
        def body(budget):
            module = importlib.import_module(module_name)
            return _call_checks(module, device, small=args.dry_run, budget_s=budget)

        return body

    run_section("triton", module_section("_gpu_triton"))
    run_section("e2e", module_section("_gpu_e2e"))
    run_section("cg", lambda b: _cg_rows(device, small=args.dry_run, budget_s=b))

    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    failed = [r for r in rows if r.get("ok") is False]
    report["ok"] = not failed and bool(rows)
    report["rows"] = rows
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if path:
        write_json(path, report)
    print()
    print(f"prefprune GPU check ({report['mode']}) on {report['device']} (torch {report['torch']}, "
          f"CUDA {report['cuda']}, Triton {report['triton']}, Python {report['python']})")
    print(format_table(rows))
    print(
        f"\n{len(rows)} rows, {len(failed)} failed, "
        f"{sum(1 for r in rows if r.get('skipped'))} skipped, {report['elapsed_s']} s"
        + (f"; wrote {path}" if path else "")
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
