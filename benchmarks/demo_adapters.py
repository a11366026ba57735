"""The demo (MiniLM-L6 recovering its fp32 self) once per adapter family x format, same step count:
the README's adapter table.

    PYTHONPATH=benchmarks .venv/bin/python -P benchmarks/demo_adapters.py [--steps 150] [--formats nf4,int3,int2]

Each run appends its report to ``demo_adapters-<device>-<date>.jsonl`` as it finishes (a rerun skips
what is there), then all of them are written as ``.json`` / ``.csv`` / ``.md``. Runs are sequential:
steps/s is the whole machine's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import common
import torch

from qft.cli import demo

# Each family at the demo's settings for it: (adapter, demo options, what they mean)
FAMILIES = [
    ("lora", {"rank": 16}, "r 16"),
    ("oft", {"oft_block_size": 32}, "block 32"),
    ("boft", {"oft_block_size": 16}, "block 16, 2 factors"),  # mixes 32 features, as OFT's block
    ("diablo", {"rank": 16}, "16 blocks"),
    ("ether", {"rank": 16}, "ETHER+, 16 blocks, both sides"),
    ("hra", {"rank": 8}, "r 8"),
]
COLUMNS = [
    "adapter",
    "format",
    "settings",
    "trainable params",
    "held-out cosine before",
    "held-out cosine after",
    "steps/s",
    "steps",
]


def main(argv=None) -> int:
    """Run the missing (family, format) demos, then write the results; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=demo.DemoConfig.steps)
    parser.add_argument("--formats", default="nf4,int3,int2")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = common.DemoTable("demo_adapters", device)
    for adapter, options, settings in FAMILIES:
        for fmt in args.formats.split(","):
            key = {"adapter": adapter, "format": fmt, "steps": args.steps}
            if table.has(key):
                continue
            config = demo.DemoConfig(format=fmt, adapter=adapter, steps=args.steps, progress=False, **options)
            config = dataclasses.replace(config, out=f"/tmp/qft-demo-{adapter}-{fmt}")
            table.run(config, key, {"settings": settings}, f"{adapter} {fmt}")
    note = f"{args.steps} steps each, one after another on this machine; `benchmarks/demo_adapters.py`."
    table.write(note, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
