"""Option parsing shared by the commands: every bad value becomes a :class:`UsageError`
naming the option, which :func:`dpmsolver.cli.main` reports with exit status 2."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..model import resolve_device
from ..recipe import POLICIES
from ..solvers import ALIASES, REGISTRY

__all__ = ["UsageError", "check_output", "check_solver", "device", "int_list", "positive_int"]


class UsageError(ValueError):
    """A bad option value; reported as ``dpmsolver: error: ...`` with exit status 2."""


def int_list(name: str, text: str, *, lo: int, hi: int | None = None) -> list[int]:
    """Comma-separated integers in ``[lo, hi]``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{name} must not be empty")
    for v in values:
        if v < lo or (hi is not None and v > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise UsageError(f"{name} values must be {bound}, got {v}")
    return values


def positive_int(name: str) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= 1."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def device(text: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:N or auto."""
    try:
        return resolve_device(text, "--device")
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_solver(name: str, option: str = "--solver") -> None:
    """A policy (``auto``), registry name or alias."""
    if name not in POLICIES and name not in REGISTRY and name not in ALIASES:
        choices = ", ".join([*POLICIES, *sorted(REGISTRY), *sorted(ALIASES)])
        raise UsageError(f"{option}: {name!r} is not a solver; choose one of: {choices}")


def check_output(path: Path, option: str) -> None:
    """Fail before any work if ``path`` cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{option}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{option}: directory {str(parent)!r} is not writable")
    if path.is_dir():
        raise UsageError(f"{option}: {str(path)!r} is a directory")
