"""The ``dpmsolver`` command-line tool.

Commands, one module each: ``sample`` and ``compare`` (:mod:`.sample`), ``solvers``,
``bench``, ``generate`` (large sharded, resumable runs; :mod:`dpmsolver.generate`) and
``tune`` (a profile fitted to the model for ``sample``/``generate --profile``).
Every output file is written atomically, and every output location is checked before any
work. Exit status: 0 done; 2 a bad option, one line on stderr naming it (:mod:`.options`);
1 a failure while working (one line); 130 interrupted (Ctrl-C, one line; ``generate``
resumes when the same command is run again).

``ems`` (:mod:`.ems`) estimates DPM-Solver-v3's model statistics for ``sample --ems FILE``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .. import __version__
from . import bench, ems, generate, sample, solvers, tune
from .options import Parser, add_threads, thread_count

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``dpmsolver`` argument parser with every command."""
    p = Parser(
        prog="dpmsolver", description="Fast, measured diffusion sampling (DPM-Solver++ and family)."
    )
    p.add_argument("--version", action="version", version=f"dpmsolver {__version__}")
    add_threads(p, top=True)
    sub = p.add_subparsers(dest="command", required=True)
    sample.add_parsers(sub)
    bench.add_parser(sub)
    solvers.add_parser(sub)
    generate.add_parser(sub)
    ems.add_parser(sub)
    tune.add_parser(sub)
    for command in sub.choices.values():
        add_threads(command, top=False)  # `dpmsolver sample --threads 2` means the same
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dpmsolver`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = thread_count(args)
    if threads:  # 0 keeps PyTorch's default
        torch.set_num_threads(threads)
    try:
        return int(args.func(args))
    except ValueError as e:  # UsageError and the library's validation errors name the option
        parser.exit(2, f"dpmsolver: error: {e}\n")
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted", None)
        print(f"dpmsolver: interrupted{hint(args) if hint else ''}", file=sys.stderr)
        return 130
    # a disk filling up; samples gone NaN/Inf; an optional dependency missing (its message
    # says what to install)
    except (OSError, FloatingPointError, ImportError) as e:
        print(f"dpmsolver: error: {e}", file=sys.stderr)
        return 1
