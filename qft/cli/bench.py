"""``python -m qft bench``: one harness over the suites in the source checkout's ``benchmarks/``.

It measures the device's copy bandwidth and matmul rate once, runs each suite with every provider
side by side, writes CSV/JSON/markdown (and PNG plots for the linear suite) under
``benchmarks/results/``, and prints the tables. On CPU it says that the timings are not GPU kernel
results.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

SUITES = ("quant", "linear", "lowbit", "optim", "e2e", "adapters")
# Suites run only when named: "kernels" compiles the small-M kernels for sm_90 and reports what the
# compiler made (benchmarks/kernel_report.py, a model; needs nvcc and Triton's NVIDIA backend).
ON_REQUEST = ("kernels",)
CPU_NOTE = "CPU run: these timings compare CPU code paths; they are not GPU kernel results."


class BenchError(ValueError):
    """Bad harness input, reported as one line by the command line."""


def benchmarks_dir() -> Path:
    """The ``benchmarks/`` folder next to the qft package (a source checkout or editable install)."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / "common.py").is_file():
        raise BenchError(f"no benchmark suites at {folder}: run from a source checkout of qft")
    return folder


def run(suites: list[str] | None, device: str | None, quick: bool, out: str | None) -> int:
    """Run ``suites`` (default: all) on ``device``; returns the exit status (1 when a suite crashed;
    the others still run and write their files)."""
    suites = list(suites or SUITES)
    unknown = [s for s in suites if s not in SUITES + ON_REQUEST]
    if unknown:
        raise BenchError(f"--suite must be among {list(SUITES + ON_REQUEST)}, got {unknown}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    folder = benchmarks_dir()
    sys.path.insert(0, str(folder))
    common = importlib.import_module("common")
    plots = importlib.import_module("plots")
    out_dir = Path(out) if out else common.RESULTS_DIR
    if device == "cpu":
        print(CPU_NOTE)
    rates = common.device_rates(device)
    print(
        f"{common.device_name(device)}: copy {rates['copy_bandwidth_gbps']:.1f} GB/s, "
        f"matmul {rates['matmul_tflops']:.2f} TFLOP/s (measured)\n"
    )
    failed = []
    for suite in suites:
        if suite == "kernels":
            if kernel_report(folder, out_dir) != 0:
                failed.append(suite)
            continue
        module = importlib.import_module(f"bench_{suite}")
        try:
            rows, meta, paths = module.run_suite(device, quick, out_dir, rates)
        except Exception as exc:  # one suite's crash must not cost the others' numbers
            traceback.print_exc()
            print(f"## {suite}: failed: {type(exc).__name__}: {exc}\n")
            failed.append(suite)
            continue
        print(f"## {suite}\n")
        print(common.markdown_table(rows, meta, getattr(module, "COLUMNS", common.QUANT_COLUMNS)))
        if suite == "linear":
            png = plots.plot_time_vs_m(rows, paths[0].with_suffix(".png"), f"qft linear + LoRA, {meta['device_name']}")
            paths = [*paths, png] if png else paths
        print("\nwrote " + ", ".join(str(p) for p in paths) + "\n")
    return 1 if failed else 0


def kernel_report(folder: Path, out_dir: Path) -> int:
    """Run ``kernel_report.py`` in a process of its own: it compiles for the GPU, so Triton must not
    be in interpreter mode there, whatever this process uses. Returns its exit status."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    command = [sys.executable, "-P", str(folder / "kernel_report.py"), "--out", str(out_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    print("## kernels\n\n" + done.stdout)
    if done.returncode:
        print(f"## kernels: failed:\n{done.stderr[-2000:]}\n")
    return done.returncode
