"""``dpmsolver solvers``: the registry, with each solver's orders, options and claims."""

from __future__ import annotations

import argparse
from typing import Any

from ..recipe import POLICIES
from ..solvers import ALIASES, REGISTRY, configurations

__all__ = ["add_parser", "cmd_solvers"]


def cmd_solvers(args: argparse.Namespace) -> int:
    """Print every registered configuration, the aliases and the policies."""
    print(f"{'solver':22s} {'order':5s} {'options':28s} {'claimed':8s} description")
    seen: set[str] = set()
    for name, cfg, s in sorted(configurations(), key=lambda c: c[0]):
        info = REGISTRY[name]
        opts = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "order")
        claim = "SDE" if s.stochastic else f"{s.claimed_order:g}"
        desc = info.description if name not in seen else ""
        print(
            f"{name if name not in seen else '':22s} {cfg.get('order')!s:5s} {opts:28s} "
            f"{claim:8s} {desc}"
        )
        if args.verbose and name not in seen:
            print(f"{'':66s} {info.reference}")
        seen.add(name)
    aliases = ", ".join(
        f"{a} = {b}{''.join(f' {k}={v}' for k, v in f.items())}"
        for a, (b, f) in sorted(ALIASES.items())
    )
    print(f"\naliases: {aliases}")
    for name in POLICIES:
        print(f"{name}: the measured recommendation for the budget and guidance (dpmsolver.{name})")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``solvers`` on the CLI's subparsers."""
    v = sub.add_parser("solvers", help="list the registered solvers")
    v.add_argument(
        "--verbose", action="store_true", help="also print each solver's paper reference"
    )
    v.set_defaults(func=cmd_solvers)
