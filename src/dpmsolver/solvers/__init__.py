"""Solvers: step functions over explicit state (:mod:`.base`), grouped in one module per
family, each registering itself in :mod:`.registry` when imported. The registry is the list
the order tests iterate, so a new solver cannot skip its convergence check.

To add a solver: write a frozen-dataclass :class:`~.base.Solver` in a new module, call
:func:`~.registry.register` at its bottom with the configurations to test, and import the
module here.
"""

from __future__ import annotations

from . import adaptive, momentum, multistep, sde, singlestep  # noqa: F401  (registration side effects)
from .adaptive import AdaptiveDPMSolver
from .base import Form, Solver, StepContext, combine, first_order_step, phi_functions
from .momentum import GHVB, HeavyBall
from .multistep import MultistepDPMSolver, MultistepState
from .registry import ALIASES, REGISTRY, SolverInfo, configurations, get_solver, register
from .sde import AncestralSolver, MultistepSDESolver, SinglestepSDESolver
from .singlestep import FastDPMSolver, SinglestepDPMSolver

__all__ = [
    "ALIASES",
    "GHVB",
    "REGISTRY",
    "AdaptiveDPMSolver",
    "AncestralSolver",
    "FastDPMSolver",
    "Form",
    "HeavyBall",
    "MultistepDPMSolver",
    "MultistepSDESolver",
    "MultistepState",
    "SinglestepDPMSolver",
    "SinglestepSDESolver",
    "Solver",
    "SolverInfo",
    "StepContext",
    "combine",
    "configurations",
    "first_order_step",
    "get_solver",
    "phi_functions",
    "register",
]
