"""``dpmsolver bench``: the benchmarks whose numbers the README quotes (:mod:`dpmsolver.bench`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..bench.run import add_arguments, run

__all__ = ["add_parser", "cmd_bench"]


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the selected benchmark sections into ``--out`` (created if missing); every
    option, ``--out`` and ``--readme`` included, is checked before any work."""
    return run(args)


def _interrupted(args: argparse.Namespace) -> str:
    return f"; the files of the sections that finished are in {args.out}"


def add_parser(sub: Any) -> None:
    """Register ``bench`` on the CLI's subparsers."""
    b = sub.add_parser(
        "bench",
        help="error-vs-NFE and sample-quality benchmarks",
        description="Error against exact solutions by NFE and guidance (ours and peers side by "
        "side), sample quality on the built-in model, thresholding study; CSV + markdown + plots.",
    )
    add_arguments(b)
    b.set_defaults(func=cmd_bench, interrupted=_interrupted)
