"""Registration cannot be forgotten: every solver class is registered, every registered
configuration is measured, and the options a family accepts are its dataclass fields."""

from __future__ import annotations

import dataclasses
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dpmsolver.solvers as solvers_pkg
from dpmsolver.solvers import (
    REGISTRY,
    AdaptiveSolver,
    MultistepSolver,
    SinglestepSolver,
    Solver,
    configurations,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {Solver, MultistepSolver, SinglestepSolver, AdaptiveSolver}


def _package_solver_classes() -> list[type[Solver]]:
    found: set[type[Solver]] = set()
    todo = list(Solver.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("dpmsolver.solvers.") and cls not in SHAPES:
            found.add(cls)
    return sorted(found, key=lambda c: c.__qualname__)


def test_every_module_of_the_solver_package_is_imported_by_it() -> None:
    names = [m.name for m in pkgutil.iter_modules(solvers_pkg.__path__)]
    code = (
        "import sys, dpmsolver.solvers; "
        f"missing = [n for n in {names!r} if 'dpmsolver.solvers.' + n not in sys.modules]; "
        "print(','.join(missing))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("cls", _package_solver_classes(), ids=lambda c: c.__qualname__)
def test_every_solver_class_is_registered(cls: type[Solver]) -> None:
    """A concrete solver class is some family's class, or the base one is built on."""
    assert not inspect.isabstract(cls), f"{cls.__qualname__} is abstract outside the shapes"
    registered = {info.cls for info in REGISTRY.values()}
    assert cls in registered or any(issubclass(r, cls) for r in registered), (
        f"{cls.__qualname__} is not registered: call register(SolverInfo(..., cls={cls.__name__}))"
    )


@pytest.mark.parametrize("cls", _package_solver_classes(), ids=lambda c: c.__qualname__)
def test_every_solver_class_has_a_shape(cls: type[Solver]) -> None:
    assert issubclass(cls, (MultistepSolver, SinglestepSolver))


def test_every_registered_family_is_measured() -> None:
    """The order tests iterate ``configurations()``; every family contributes to it, and the
    recorded table of measured orders has a row for each configuration."""
    measured = {name for name, _, _ in configurations()}
    assert measured == set(REGISTRY)
    table = (ROOT / "benchmarks" / "orders.md").read_text()
    for name, cfg, _ in configurations():
        opts = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "order")
        row = f"| `{name}` | {cfg.get('order')} | {opts} |"
        assert row in table, f"benchmarks/orders.md has no row {row}; regenerate it"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_options_are_the_dataclass_fields(name: str) -> None:
    info = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(info.cls) if f.init}  # type: ignore[arg-type]
    assert set(info.options) == fields - {"order"} - set(info.fixed)
    solver = info.build(order=info.default_order)
    for option in info.options:
        rebuilt = info.build(order=info.default_order, **{option: getattr(solver, option)})
        assert rebuilt == solver
