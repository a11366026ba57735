"""Command line: ``python -m qft env``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the ``qft`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m qft", description="qft: quantized low-rank finetuning kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="versions, CUDA extension, GPU, and which implementation each op uses")
    args = parser.parse_args(argv)
    if args.command == "env":
        from qft import environment

        print(environment.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
