"""The ``dpmsolver`` command-line tool.

Commands, one module each: ``sample`` and ``compare`` (:mod:`.sample`), ``solvers``,
``bench`` and ``generate`` (large sharded, resumable runs; :mod:`dpmsolver.generate`).
Every output file is written atomically; bad options exit with status 2 and a message
naming the option (:mod:`.options`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from .. import __version__
from . import bench, generate, sample, solvers

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``dpmsolver`` argument parser with every command."""
    p = argparse.ArgumentParser(
        prog="dpmsolver", description="Fast, measured diffusion sampling (DPM-Solver++ and family)."
    )
    p.add_argument("--version", action="version", version=f"dpmsolver {__version__}")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (default 1; 0 = PyTorch's default)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sample.add_parsers(sub)
    bench.add_parser(sub)
    solvers.add_parser(sub)
    generate.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dpmsolver`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.exit(2, f"dpmsolver: error: --threads must be >= 0, got {args.threads}\n")
    if args.threads:
        # For small models extra intra-op threads mostly wait on each other, badly so on a
        # busy machine; 0 keeps PyTorch's default.
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args))
    except ValueError as e:  # UsageError and the library's validation errors name the option
        parser.exit(2, f"dpmsolver: error: {e}\n")
    return 1
