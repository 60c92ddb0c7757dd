"""``dpmsolver bench``: the benchmarks whose numbers the README quotes (:mod:`dpmsolver.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..bench.run import add_arguments, run
from .options import UsageError

__all__ = ["add_parser", "cmd_bench"]


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the selected benchmark sections into ``--out``."""
    out = Path(args.out)
    if not out.is_dir():
        raise UsageError(f"--out: directory {str(out)!r} does not exist")
    return run(args)


def add_parser(sub: Any) -> None:
    """Register ``bench`` on the CLI's subparsers."""
    b = sub.add_parser(
        "bench",
        help="error-vs-NFE and sample-quality benchmarks",
        description="Error against exact solutions by NFE and guidance (ours and peers side by "
        "side), sample quality on the built-in model, thresholding study; CSV + markdown + plots.",
    )
    add_arguments(b)
    b.set_defaults(func=cmd_bench)
