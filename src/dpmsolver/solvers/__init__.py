"""Solvers: step functions over explicit state.

- :mod:`.base`: what a solver is (:class:`Solver`, :class:`StepContext`) and the
  exponential-integrator arithmetic every family shares (:class:`Form`, phi functions,
  quadrature weights).
- :mod:`.shapes`: the three shapes (:class:`MultistepSolver`, :class:`SinglestepSolver`,
  :class:`AdaptiveSolver`), base classes that own the skeleton of a step, its cost and its
  plan.
- one module per family, each registering itself in :mod:`.registry`, the list the order
  tests iterate (so a registered solver cannot skip its convergence check).

To add a solver: one module in this package with a frozen dataclass deriving from a shape
(its coefficients) and one :func:`register` call at its bottom. Every module of the package
is imported here, so a new one cannot be left out, and tests/test_registry.py fails if a
solver class is not registered.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    Form,
    Solver,
    StepContext,
    combine,
    exponential_moments,
    first_order_step,
    heun_update,
    lagrange_weights,
    phi_functions,
    phi_sequence,
    sigma_step,
)
from .registry import ALIASES, REGISTRY, SolverInfo, configurations, get_solver, register
from .shapes import (
    AdaptiveSolver,
    MultistepSolver,
    MultistepState,
    SinglestepSolver,
    history_order,
    singlestep_plan,
)

# Every family module registers itself on import. The listed order is the registry's (and
# so the order of every table generated from it); any module not listed is still imported.
_FAMILIES = (
    "singlestep",
    "adaptive",
    "multistep",
    "deis",
    "edm",
    "linear_multistep",
    "momentum",
    "sde",
    "unipc",
)
for _name in (*_FAMILIES, *(m.name for m in pkgutil.iter_modules(__path__))):
    importlib.import_module(f"{__name__}.{_name}")

from .adaptive import AdaptiveDPMSolver  # noqa: E402
from .deis import DEIS  # noqa: E402
from .edm import Heun  # noqa: E402
from .linear_multistep import PNDM, LinearMultistep  # noqa: E402
from .momentum import GHVB, HeavyBall, HeavyBallDPMSolver  # noqa: E402
from .multistep import MultistepDPMSolver  # noqa: E402
from .sde import AncestralSolver, MultistepSDESolver, SinglestepSDESolver  # noqa: E402
from .singlestep import FastDPMSolver, SinglestepDPMSolver  # noqa: E402
from .unipc import UniPC  # noqa: E402

__all__ = [
    "ALIASES",
    "DEIS",
    "GHVB",
    "PNDM",
    "REGISTRY",
    "AdaptiveDPMSolver",
    "AdaptiveSolver",
    "AncestralSolver",
    "FastDPMSolver",
    "Form",
    "HeavyBall",
    "HeavyBallDPMSolver",
    "Heun",
    "LinearMultistep",
    "MultistepDPMSolver",
    "MultistepSDESolver",
    "MultistepSolver",
    "MultistepState",
    "SinglestepDPMSolver",
    "SinglestepSDESolver",
    "SinglestepSolver",
    "Solver",
    "SolverInfo",
    "StepContext",
    "UniPC",
    "combine",
    "configurations",
    "exponential_moments",
    "first_order_step",
    "get_solver",
    "heun_update",
    "history_order",
    "lagrange_weights",
    "phi_functions",
    "phi_sequence",
    "register",
    "sigma_step",
    "singlestep_plan",
]
