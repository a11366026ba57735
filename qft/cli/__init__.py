"""The command line, in one place: ``python -m qft demo | bench | env`` (``demo.py``, ``bench.py``, ``env.py``)."""

from __future__ import annotations

import argparse
import dataclasses


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage block, no traceback)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from qft import adapters, formats
    from qft.cli.demo import DemoConfig

    parser = _Parser(prog="python -m qft", description="qft: quantized low-rank finetuning kernels")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser("demo", help="quantize MiniLM, train adapters to recover it, report")
    defaults = DemoConfig()
    demo.add_argument("--model", help="local Hugging Face BERT/Llama-style model folder (default: MiniLM-L6)")
    demo.add_argument("--format", default=defaults.format, help=", ".join(formats.FORMATS))
    kinds = adapters.specs()
    demo.add_argument("--adapter", default=defaults.adapter, help=f"adapter kind: {' or '.join(s.name for s in kinds)}")
    demo.add_argument("--oft-block-size", type=int, default=defaults.oft_block_size, help="OFT and BOFT block size")
    demo.add_argument("--init", default=defaults.init, help="adapter init: default, loftq, apiq or apiq-seq")
    demo.add_argument("--iec", action="store_true", help="LoRA with IR-QLoRA's elastic connections")
    demo.add_argument("--bits-budget", type=float, default=None, help="a format per layer within this bits/param")
    demo.add_argument(
        "--quant-method",
        default=defaults.quant_method,
        help="hqq (default), rtn or clip (affine ranges), or gptq (calibrated on training batches)",
    )
    demo.add_argument(
        "--calibration-batches", type=int, default=defaults.calibration_batches, help="gptq/apiq training batches"
    )
    demo.add_argument(
        "--rank",
        type=int,
        default=defaults.rank,
        help="LoRA rank; DiaBlo and ETHER blocks; HRA reflections (BOFT takes 2 butterfly factors)",
    )
    demo.add_argument("--steps", type=int, default=defaults.steps)
    demo.add_argument("--batch-size", type=int, default=defaults.batch_size)
    lrs = ", ".join(f"{s.demo_lr:g} for {s.name}" for s in kinds)
    demo.add_argument("--lr", type=float, help=f"learning rate (default: {lrs})")
    demo.add_argument("--out", default=defaults.out, help="folder for the trained adapters (PEFT format)")
    demo.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    demo.add_argument("--optim", default=defaults.optim, help="paged-adamw8bit (qft) or adamw (torch)")
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    bench = commands.add_parser("bench", help="benchmark suites side by side with the peers")
    suites = "quant, linear, lowbit, optim, e2e (repeatable; default: all); kernels: the static sm_90 report"
    bench.add_argument("--suite", action="append", help=suites)
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    bench.add_argument("--out", help="results folder (default: benchmarks/results)")

    commands.add_parser("env", help="versions, CUDA extension, GPU, and which implementation each op uses")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``qft`` command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "env":
        from qft.cli import env

        print(env.report())
        return 0
    if args.command == "bench":
        from qft.cli import bench

        try:
            return bench.run(args.suite, args.device, args.quick, args.out)
        except bench.BenchError as exc:
            parser.exit(2, f"python -m qft bench: error: {exc}\n")
    from qft.cli import demo

    # DemoConfig's fields that are options have the option's name (progress is --no-progress)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(demo.DemoConfig) if hasattr(args, f.name)}
    config = demo.DemoConfig(**fields, progress=not args.no_progress)
    try:
        result = demo.run(config)
    except demo.DemoError as exc:
        parser.exit(2, f"python -m qft demo: error: {exc}\n")
    print(demo.report(result))
    return 0
