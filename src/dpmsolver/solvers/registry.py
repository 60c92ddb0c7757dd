"""The solver registry: every solver the library offers, its orders and options, and the
configurations the order tests run. The registry *is* the test list, so a registered
solver cannot skip its convergence check (tests/test_order.py). Each solver module
registers its own families when imported."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .._validate import check_choice
from .base import Form, Solver

__all__ = [
    "ALIASES",
    "FORM_FAMILIES",
    "REGISTRY",
    "SolverInfo",
    "configurations",
    "get_solver",
    "register",
]


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver family.

    Attributes:
        name: registry key.
        cls: the solver class; the family builds ``cls(**fixed, order=..., **options)``.
        orders: accepted ``order`` values; ``default_order`` is used when none is given.
        description: one line for ``dpmsolver solvers`` and the README.
        reference: paper and algorithm/equation it implements.
        configurations: option sets (each with ``order``) the order tests run.
        fixed: constructor arguments this family fixes (e.g. the prediction ``form``).

    The accepted options are derived: every constructor field of ``cls`` except ``order``
    and the fixed ones.
    """

    name: str
    cls: type[Solver]
    orders: tuple[int, ...]
    default_order: int
    description: str
    reference: str
    configurations: tuple[Mapping[str, Any], ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def options(self) -> tuple[str, ...]:
        """Option names ``get_solver`` accepts for this family."""
        taken = {"order", *self.fixed}
        return tuple(f.name for f in fields(self.cls) if f.init and f.name not in taken)  # type: ignore[arg-type]

    def build(self, **kwargs: Any) -> Solver:
        """A solver of this family (``order`` and options as keyword arguments)."""
        return self.cls(**{**self.fixed, **kwargs})


REGISTRY: dict[str, SolverInfo] = {}
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}


def register(
    info: SolverInfo, aliases: Mapping[str, Mapping[str, Any]] | None = None
) -> SolverInfo:
    """Add a solver family (and short aliases that fix some options) to the registry."""
    if info.name in REGISTRY or info.name in ALIASES:
        raise ValueError(f"solver {info.name!r} is already registered")
    if info.default_order not in info.orders or not info.configurations:
        raise ValueError(f"solver {info.name!r}: default order and configurations are required")
    for cfg in info.configurations:
        info.build(**cfg)  # fail at import time, not in the order test
    REGISTRY[info.name] = info
    for alias, fixed in (aliases or {}).items():
        ALIASES[alias] = (info.name, dict(fixed))
    return info


def get_solver(name: str, order: int | None = None, **options: Any) -> Solver:
    """Build a solver by registry name or alias, validating ``order`` and options."""
    check_choice("solver", name, sorted(REGISTRY) + sorted(ALIASES))
    if name in ALIASES:
        base, fixed = ALIASES[name]
        if order is not None and "order" in fixed and order != fixed["order"]:
            raise ValueError(
                f"solver {name!r} has order {fixed['order']}; got order={order} "
                f"(use solver={base!r} to choose the order)"
            )
        clash = {k for k in options if k in fixed and options[k] != fixed[k]}
        if clash:
            raise ValueError(f"solver {name!r} fixes {sorted(clash)}; use solver={base!r}")
        options = {**fixed, **options}
        order = options.pop("order", order)
        name = base
    info = REGISTRY[name]
    order = info.default_order if order is None else order
    check_choice(f"order (for solver {name!r})", order, info.orders)
    for key in options:
        check_choice(f"option of solver {name!r}", key, info.options)
    return info.build(order=order, **options)


def configurations() -> Iterator[tuple[str, Mapping[str, Any], Solver]]:
    """Every (registry name, options, solver) the order tests must check."""
    for name, info in REGISTRY.items():
        for cfg in info.configurations:
            yield name, cfg, info.build(**cfg)


# (name prefix, prediction form, label): DPM-Solver++ works on the data prediction, the
# original DPM-Solver on the noise prediction; each solver kind is registered once per form.
FORM_FAMILIES: tuple[tuple[str, Form, str], ...] = (
    ("dpmpp", Form.DATA, "DPM-Solver++"),
    ("dpm", Form.NOISE, "DPM-Solver"),
)
