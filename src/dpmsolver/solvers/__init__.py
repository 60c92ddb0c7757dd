"""The solver registry: every solver the library offers, its orders and options, and the
configurations the order tests run. The registry *is* the test list, so a registered
solver cannot skip its convergence check (tests/test_order.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._validate import check_choice
from .adaptive import AdaptiveDPMSolver
from .base import Form, Solver, StepContext, first_order_step, phi_functions
from .multistep import MultistepDPMSolver, MultistepState
from .singlestep import FastDPMSolver, SinglestepDPMSolver

__all__ = [
    "ALIASES",
    "REGISTRY",
    "AdaptiveDPMSolver",
    "FastDPMSolver",
    "Form",
    "MultistepDPMSolver",
    "MultistepState",
    "SinglestepDPMSolver",
    "Solver",
    "SolverInfo",
    "StepContext",
    "configurations",
    "first_order_step",
    "get_solver",
    "phi_functions",
    "register",
]


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver family.

    Attributes:
        name: registry key.
        build: ``build(order=..., **options) -> Solver``.
        orders: accepted ``order`` values; ``default_order`` is used when none is given.
        description: one line for ``dpmsolver solvers`` and the README.
        reference: paper and algorithm/equation it implements.
        configurations: option sets (each with ``order``) the order tests run.
        options: accepted extra option names.
    """

    name: str
    build: Callable[..., Solver]
    orders: tuple[int, ...]
    default_order: int
    description: str
    reference: str
    configurations: tuple[Mapping[str, Any], ...]
    options: tuple[str, ...] = field(default=())


REGISTRY: dict[str, SolverInfo] = {}
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}


def register(info: SolverInfo, aliases: Mapping[str, Mapping[str, Any]] | None = None) -> SolverInfo:
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


def _family(form: Form, cls: type[Solver]) -> Callable[..., Solver]:
    def build(**kwargs: Any) -> Solver:
        return cls(form=form, **kwargs)  # type: ignore[call-arg]

    return build


_MS = "Lu et al. 2022, DPM-Solver++ Alg. 2 / App. B (multistep)"
for _prefix, _form, _label in (("dpmpp", Form.DATA, "DPM-Solver++"), ("dpm", Form.NOISE, "DPM-Solver")):
    _what = "data" if _form is Form.DATA else "noise"
    register(
        SolverInfo(
            name=f"{_prefix}_multistep",
            build=_family(_form, MultistepDPMSolver),
            orders=(1, 2, 3),
            default_order=2,
            description=f"{_label} multistep ({_what} prediction); order 3 uses the full "
            "second-derivative term (third order, unlike the published 3M)",
            reference=_MS,
            configurations=(
                {"order": 1},
                {"order": 2, "variant": "midpoint"},
                {"order": 2, "variant": "heun"},
                {"order": 3},
                {"order": 3, "third_order": "legacy"},
            ),
            options=("variant", "third_order"),
        ),
        aliases={f"{_prefix}_2m": {"order": 2}, f"{_prefix}_3m": {"order": 3}},
    )
    register(
        SolverInfo(
            name=f"{_prefix}_singlestep",
            build=_family(_form, SinglestepDPMSolver),
            orders=(1, 2, 3),
            default_order=2,
            description=f"{_label} singlestep ({_what} prediction), order k costs k evaluations",
            reference="Lu et al. 2022, DPM-Solver Alg. 1-2; DPM-Solver++ Alg. 1 (2S)",
            configurations=(
                {"order": 1},
                {"order": 2, "variant": "midpoint"},
                {"order": 2, "variant": "heun"},
                {"order": 3, "variant": "midpoint"},
                {"order": 3, "variant": "heun"},
            ),
            options=("variant", "r1", "r2"),
        ),
        aliases={f"{_prefix}_2s": {"order": 2}, f"{_prefix}_3s": {"order": 3}},
    )
    register(
        SolverInfo(
            name=f"{_prefix}_fast",
            build=_family(_form, FastDPMSolver),
            orders=(2, 3),
            default_order=3,
            description=f"{_label}-fast: singlestep orders mixed to spend exactly the NFE budget",
            reference="Lu et al. 2022, DPM-Solver Sec. 3.4, App. D.2",
            configurations=({"order": 2}, {"order": 3}),
            options=("variant", "r1", "r2"),
        ),
    )
    register(
        SolverInfo(
            name=f"{_prefix}_adaptive",
            build=_family(_form, AdaptiveDPMSolver),
            orders=(2, 3),
            default_order=3,
            description=f"{_label}-12/23 adaptive step size with rtol/atol error control",
            reference="Lu et al. 2022, DPM-Solver Sec. 4.2, Alg. 4",
            configurations=({"order": 2}, {"order": 3}),
            options=("rtol", "atol", "h_init", "theta"),
        ),
    )

register(
    SolverInfo(
        name="ddim",
        build=_family(Form.DATA, MultistepDPMSolver),
        orders=(1,),
        default_order=1,
        description="DDIM (deterministic, eta = 0) = first-order DPM-Solver(++)",
        reference="Song et al. 2021, DDIM Eq. 12; DPM-Solver++ Eq. 11",
        configurations=({"order": 1},),
    )
)
