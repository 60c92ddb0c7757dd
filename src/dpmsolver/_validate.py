"""Small input-validation helpers shared by every public entry point.

Every error names the parameter and what it accepts, so a user can fix the call from the
message alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def check_choice(name: str, value: T, choices: Iterable[T]) -> T:
    """Return ``value`` if it is one of ``choices``; raise a ValueError naming ``name``."""
    options = list(choices)
    if value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {listed}")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_finite_float(name: str, value: Any, *, positive: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real number (and > 0 if ``positive``)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    if positive and out <= 0:
        raise ValueError(f"{name} must be > 0, got {out}")
    return out


def check_non_negative(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0 (noise fractions
    ``eta``, noise scales ``s_noise``, churn ``gamma``)."""
    out = check_finite_float(name, value)
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return out


def check_finite_floats(
    name: str, values: Iterable[Any], *, minimum: float | None = None
) -> tuple[float, ...]:
    """Each of ``values`` as a float if it is a finite real number (not bool), at least
    ``minimum`` where given; else a ValueError naming ``name[i]`` (per-step sequences:
    compensation ratios, correction coefficients, a step envelope)."""
    want = "a finite number" + ("" if minimum is None else f" >= {minimum:g}")
    out = []
    for i, v in enumerate(values):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or (minimum is not None and v < minimum)
        ):
            raise ValueError(f"{name}[{i}] must be {want}, got {v!r}")
        out.append(float(v))
    return tuple(out)
