"""The demo (MiniLM-L6 recovering its fp32 self) once per calibrated method x format, LoRA r16, same
step count: the README's calibrated-quantization table (issue 19).

    PYTHONPATH=benchmarks .venv/bin/python -P benchmarks/demo_calibrated.py [--steps 150] [--formats nf4,int3,int2]
        [--methods default,loftq,icq,gptq,apiq,icq+gptq+apiq]

Each run appends its report to ``demo_calibrated-<device>-<date>.jsonl`` as it finishes (a rerun skips
what is there), then all of them are written as ``.json`` / ``.csv`` / ``.md``. Calibration batches
come from the training split only (the demo's ``--calibration-batches``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import common
import torch

from qft import formats
from qft.cli import demo

# (method, demo options, what they mean); "{icq}" in a format is the format's ICQ variant where it has one
METHODS = [
    ("default", {}, "HQQ ranges (code books: their own search), PEFT's init"),
    ("loftq", {"init": "loftq"}, "LoftQ init, 4 rounds"),
    ("icq", {"quant_method": "icq"}, "IR-QLoRA's ICQ (code books: the _icq variant)"),
    ("gptq", {"quant_method": "gptq"}, "GPTQ with act-order, 8 calibration batches"),
    ("apiq", {"init": "apiq", "quant_method": "gptq"}, "ApiQ layer-wise init over GPTQ, 8 calibration batches"),
    ("icq+gptq+apiq", {"init": "apiq", "quant_method": "gptq", "format": "{icq}"}, "ApiQ over GPTQ on the _icq format"),
    ("apiq lr 5e-4", {"init": "apiq", "quant_method": "gptq", "lr": 5e-4}, "ApiQ over GPTQ, a quarter of the lr"),
    ("apiq-seq lr 5e-4", {"init": "apiq-seq", "quant_method": "gptq", "lr": 5e-4}, "ApiQ layer after layer, lr / 4"),
]
# LQ-LoRA's budgeted formats: one run each, whatever the format list (the plan picks the formats)
PLANS = [
    ("2.5-bit plan", {"bits_budget": 2.5}, "qft.plan_bits over lloyd2/int2/lloyd3/int3/nf4, HQQ ranges"),
    (
        "2.5-bit plan + gptq + apiq",
        {"bits_budget": 2.5, "quant_method": "gptq", "init": "apiq"},
        "the plan over GPTQ candidates, ApiQ init",
    ),
]
COLUMNS = [
    "method",
    "format",
    "settings",
    "linear weights bits/param after",
    "held-out cosine before",
    "held-out cosine after",
    "steps/s",
    "steps",
]


def _format_for(base: str, options: dict) -> str | None:
    """The format a method runs on: ``base``, or its ICQ variant (None when it has none)."""
    if options.get("format") != "{icq}":
        return base
    variant = formats.icq_format(base) if not formats.get_format(base).affine else None
    return variant


def main(argv=None) -> int:
    """Run the missing (method, format) demos, then write the results; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=demo.DemoConfig.steps)
    parser.add_argument("--formats", default="nf4,int3,int2")
    every = [m for m, _, _ in METHODS + PLANS]
    parser.add_argument("--methods", default=",".join(every), help="a comma list of METHODS and PLANS")
    args = parser.parse_args(argv)
    chosen = args.methods.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = common.DemoTable("demo_calibrated", device)
    runs = [(base, *method) for base in args.formats.split(",") for method in METHODS]
    runs += [("plan", *plan) for plan in PLANS]
    for base, method, options, settings in runs:
        if method not in chosen:
            continue
        fmt = "nf4" if base == "plan" else _format_for(base, options)  # a plan's demo ignores --format
        key = {"method": method, "base format": base, "steps": args.steps}
        if fmt is None or table.has(key):
            continue
        config = demo.DemoConfig(steps=args.steps, progress=False, **{**options, "format": fmt})
        config = dataclasses.replace(config, out=f"/tmp/qft-demo-{method}-{fmt}".replace(" ", "_"))
        table.run(config, key, {"settings": settings}, f"{method} {fmt}")
    table.write(
        f"LoRA r16, {args.steps} steps each (the demo's lr unless the method says), one after another.", COLUMNS
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
