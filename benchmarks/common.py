"""Shared benchmark plumbing: timing, the device's measured copy bandwidth, result rows and files.

GPU timings use ``triton.testing.do_bench`` (median with p20/p80; it clears the L2 cache before
each run), or ``do_bench_cudagraph`` for the small-M rows where launch overhead would dominate. CPU
timings use ``time.perf_counter`` over repeats and are not kernel results.

Every provider x case is its own try (``Recorder.attempt``): a failing peer becomes a row with an
``error`` and the rest of the suite runs on. Rows are appended to ``<suite>-<device>-<date>.jsonl``
as they are measured, so a suite killed at its time limit keeps what it finished. The environment
variables ``QFT_BENCH_PROVIDERS``, ``QFT_BENCH_SHAPES`` (``NxK``), ``QFT_BENCH_MS`` and
``QFT_BENCH_FORMATS`` (comma lists; the suites' ``--providers`` / ``--shapes`` / ``--ms`` /
``--formats`` set them) select what runs.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


CPU_SAMPLE_S = 5e-3  # a CPU sample spans at least this many seconds of calls
CPU_MIN_SAMPLES = 7  # and calls shorter than that get at least this many samples


def time_ms(fn: Callable[[], object], device: str, repeats: int, graph: bool = False) -> tuple[float, float, float]:
    """``(p50, p20, p80)`` milliseconds of ``fn()`` on ``device``; ``graph``: replayed as a CUDA graph
    (GPU only; no Python or launch overhead, the L2 is not flushed)."""
    if device == "cuda":
        import triton.testing

        if graph:
            p50, p20, p80 = triton.testing.do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8])
        else:
            p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    # Sub-millisecond calls: each sample averages enough calls to span ~5 ms, and there are at least 7
    # samples, so the median is not one call's scheduling noise (every provider is timed alike).
    inner = max(1, int(CPU_SAMPLE_S / max(once, 1e-7)))
    count = max(repeats, CPU_MIN_SAMPLES) if once < CPU_SAMPLE_S else repeats
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) * 1e3 / inner)
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def time_side_by_side(fns: dict, device: str, repeats: int) -> dict:
    """``{key: (p50, p20, p80)}`` ms of each ``fns[key]()``, or ``{key: exception}`` for one that raises.
    On CPU the providers are sampled in turns (one sample of each per round, each sample spanning
    ``CPU_SAMPLE_S`` of calls, at least ``CPU_MIN_SAMPLES`` rounds whatever a call costs), so a slow spell
    of a shared machine falls on every provider alike rather than on whichever ran then; on a GPU each is
    timed by ``time_ms`` in turn."""
    results, inner = {}, {}
    for key, fn in fns.items():
        try:
            if device == "cuda":
                results[key] = time_ms(fn, device, repeats)
                continue
            fn()  # warm-up
            start = time.perf_counter()
            fn()
            inner[key] = max(1, int(CPU_SAMPLE_S / max(time.perf_counter() - start, 1e-7)))
        except Exception as exc:  # a failing provider must not take the others down (its row prints it)
            results[key] = exc
    samples = {key: [] for key in inner}
    for _ in range(max(repeats, CPU_MIN_SAMPLES)):
        for key in list(samples):
            try:
                start = time.perf_counter()
                for _ in range(inner[key]):
                    fns[key]()
                samples[key].append((time.perf_counter() - start) * 1e3 / inner[key])
            except Exception as exc:
                results[key] = exc
                del samples[key]
    for key, times in samples.items():
        q = statistics.quantiles(times, n=10, method="inclusive")
        results[key] = (statistics.median(times), q[1], q[7])
    return results


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Measured device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    p50, _, _ = time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (p50 * 1e-3) / 1e9


def matmul_tflops(device: str, repeats: int = 3) -> float:
    """Measured dense matmul rate: bf16 8192^3 on a GPU, fp32 1024^3 on CPU."""
    size, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    p50, _, _ = time_ms(lambda: a @ b, device, repeats)
    return 2 * size**3 / (p50 * 1e-3) / 1e12


def device_rates(device: str) -> dict[str, float]:
    """The device's measured copy bandwidth (GB/s) and matmul rate (TFLOP/s): the floors' divisors."""
    return {"copy_bandwidth_gbps": copy_bandwidth_gbs(device), "matmul_tflops": matmul_tflops(device)}


def peer_providers() -> list[str]:
    """qft first, then PEFT over bf16 and PEFT over bitsandbytes where those are installed."""
    names = ["qft"]
    try:
        import peft  # noqa: F401
    except ImportError:
        return names
    names.append("peft-bf16")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return names
    return [*names, "peft-bnb"]


FILTERS = ("providers", "shapes", "ms", "formats")


def wanted(kind: str, value) -> bool:
    """True unless ``QFT_BENCH_<KIND>`` lists values and ``value`` is not among them."""
    listed = os.environ.get(f"QFT_BENCH_{kind.upper()}", "").strip()
    if not listed:
        return True
    return str(value).lower() in {v.strip().lower() for v in listed.split(",")}


def shape_text(shape) -> str:
    """``(N, K)`` as the ``NxK`` the shape filter matches."""
    return "x".join(str(d) for d in shape)


def add_filter_arguments(parser) -> None:
    """``--providers``, ``--shapes``, ``--ms``, ``--formats``: comma lists exported as QFT_BENCH_*."""
    for kind in FILTERS:
        parser.add_argument(f"--{kind}", help=f"comma list: run only these {kind} (QFT_BENCH_{kind.upper()})")


def apply_filter_arguments(args) -> None:
    """Export the filters given on the command line for ``wanted``."""
    for kind in FILTERS:
        value = getattr(args, kind, None)
        if value:
            os.environ[f"QFT_BENCH_{kind.upper()}"] = value


def ratio(rows: list[dict], row: dict, peer: str, same=("op",)) -> float | None:
    """peer's p50 over ``row``'s for the row of ``peer`` that matches ``row`` in ``same``; None if
    either has no time (not measured, or an error row)."""
    if row.get("p50_ms") is None:
        return None
    for other in rows:
        if other["provider"] == peer and other.get("p50_ms") and all(other.get(k) == row.get(k) for k in same):
            return other["p50_ms"] / row["p50_ms"]
    return None


class Recorder:
    """The rows of one suite: kept in order, each appended to a JSONL file the moment it exists."""

    def __init__(self, suite: str, device: str, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.suite, self.rows = suite, []
        self.path = out_dir / f"{result_stem(suite, device)}.jsonl"
        self.path.write_text("")

    def add(self, row: dict) -> dict:
        """Keep ``row`` and append it to the JSONL file."""
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        return row

    def attempt(self, label: dict, measure: Callable[[], list[dict]]) -> list[dict]:
        """Rows of ``measure()``, or one row of ``label`` + ``error`` when it raises (traceback on stderr)."""
        try:
            rows = measure()
        except Exception as exc:  # a failing provider must not take the suite down
            traceback.print_exc(file=sys.stderr)
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            return [self.add({"suite": self.suite, **label, "error": message})]
        return [self.add(row) for row in rows]

    def build(self, label: dict, make: Callable[[], object]):
        """``make()``, or None after an error row of ``label`` (op "build") when it raises."""
        made = []
        self.attempt({**label, "op": "build"}, lambda: made.append(make()) or [])
        return made[0] if made else None


def suite_main(argv, doc: str, run_suite, columns, cpu_note: str = "", repeats: bool = True) -> int:
    """The command line every suite shares: --device, --quick, (--repeats), --out, the filters;
    prints the table."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the small configuration, also on a GPU")
    if repeats:
        parser.add_argument("--repeats", type=int, default=3, help="CPU timing repeats (GPU uses do_bench)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the result files")
    add_filter_arguments(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    apply_filter_arguments(args)
    if args.device == "cpu" and cpu_note:
        print(cpu_note, file=sys.stderr)
    extra = {"repeats": args.repeats} if repeats else {}
    rows, meta, paths = run_suite(args.device, args.quick, args.out, **extra)
    print(markdown_table(rows, meta, columns))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def device_name(device: str) -> str:
    """Human name of the device: the GPU's name, or the CPU's model."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def versions() -> dict[str, str]:
    """Versions that the numbers depend on."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    for name in ("triton", "bitsandbytes", "peft", "transformers", "qft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def slug(text: str) -> str:
    """File-name-safe lower-case form of ``text``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


TIMING_COLUMNS = ["op", "provider", "shape", "dtype", "p50_ms", "p20_ms", "p80_ms"]  # every suite's first
QUANT_COLUMNS = [
    *TIMING_COLUMNS,
    "gbps",
    "pct_of_copy_bw",
    "vs_bitsandbytes",
    "matches_bitsandbytes",
]


def write_results(
    suite: str, device: str, rows: list[dict], meta: dict, out_dir: Path = RESULTS_DIR, columns=QUANT_COLUMNS
) -> list[Path]:
    """Write ``rows`` as ``<suite>-<device>-<date>.{json,csv,md}``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    rows = [{**row, "versions": stamp} for row in rows]  # each row stands alone once copied elsewhere
    stem = result_stem(suite, device)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "md")]
    paths[0].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    fields = list(dict.fromkeys(key for row in rows for key in row))  # error rows have fewer keys
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    paths[2].write_text(markdown_table(rows, meta, columns) + "\n")
    return paths


class DemoTable:
    """A table of demo runs, one ``qft.cli.demo.run`` per row, kept in ``<name>-<device>-<date>.jsonl``
    as each run finishes, so a rerun does only what is missing; ``write`` makes the .json/.csv/.md."""

    def __init__(self, name: str, device: str) -> None:
        self.name, self.device = name, device
        self.log = RESULTS_DIR / f"{result_stem(name, device)}.jsonl"
        self.rows = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def has(self, key: dict) -> bool:
        """Whether a finished row matches every item of ``key``."""
        return any(all(row.get(k) == v for k, v in key.items()) for row in self.rows)

    def run(self, config, key: dict, extra: dict, label: str) -> None:
        """Run the demo with ``config`` and keep its report with ``key`` and ``extra`` added."""
        from qft.cli import demo

        print(f"{label} ...", file=sys.stderr, flush=True)
        row = {**demo.run(config), **key, **extra}
        with self.log.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        self.rows.append(row)

    def write(self, note: str, columns) -> list[Path]:
        """Every finished row as the table's result files."""
        meta = {"device": self.device, "device_name": device_name(self.device), "versions": versions(), "note": note}
        return write_results(self.name, self.device, self.rows, meta, RESULTS_DIR, columns)


def result_stem(suite: str, device: str) -> str:
    """``<suite>-<device name>-<date>``: the name of a suite's result files."""
    return f"{suite}-{slug(device_name(device))}-{datetime.date.today().isoformat()}"


def markdown_table(rows: list[dict], meta: dict, columns=QUANT_COLUMNS) -> str:
    """A compact markdown table of the rows, headed by the device and versions (and an ``error``
    column when some row failed)."""
    if any(row.get("error") for row in rows):
        columns = [*columns, "error"]
    head = f"**{meta['device_name']}** ({meta['device']}); " + ", ".join(
        f"{k} {v}" for k, v in meta["versions"].items()
    )
    if meta.get("note"):
        head += f"\n\n{meta['note']}"
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
