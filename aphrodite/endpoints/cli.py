"""The ``aphrodite`` command: ``aphrodite bench throughput|latency`` (``run`` and ``yaml`` slot in
beside ``bench``: one ``_add_<command>_parser`` and one ``cmd_<command>`` each).

Parsing stays light: torch and the engine load only once a command runs.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from aphrodite.benchmarks import throughput
    throughput.main(args)
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from aphrodite.benchmarks import latency
    latency.main(args)
    return 0


def _add_bench_parser(subparsers: Any) -> None:
    from aphrodite.benchmarks import latency, throughput
    bench = subparsers.add_parser("bench", help="Benchmark the engine (vLLM's `vllm bench` flags and metrics).",
                                  description="Benchmark the engine.")
    kinds = bench.add_subparsers(dest="bench_command", metavar="{throughput,latency}", required=True)
    p = kinds.add_parser("throughput", help="Offline throughput of many random prompts.",
                         description=throughput.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput.add_cli_args(p)
    p.set_defaults(func=cmd_bench_throughput)
    p = kinds.add_parser("latency", help="Latency of one batch, repeated.",
                         description=latency.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    latency.add_cli_args(p)
    p.set_defaults(func=cmd_bench_latency)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aphrodite", description="Aphrodite: an LLM inference and serving engine.")
    from aphrodite import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aphrodite`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:  # bad input: a message, not a traceback
        print(f"aphrodite: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
