"""Solvers: step functions over explicit state (:mod:`.base`), grouped in one module per
family, each registering itself in :mod:`.registry` when imported. The registry is the list
the order tests iterate, so a new solver cannot skip its convergence check.

To add a solver: write a frozen-dataclass :class:`~.base.Solver` in a new module, call
:func:`~.registry.register` at its bottom with the configurations to test, and import the
module here.
"""

from __future__ import annotations

from . import (  # noqa: F401  (registration side effects)
    adaptive,
    deis,
    edm,
    linear_multistep,
    momentum,
    multistep,
    sde,
    singlestep,
    unipc,
    v3,
)
from .adaptive import AdaptiveDPMSolver
from .base import (
    Form,
    Solver,
    StepContext,
    boundary_update,
    combine,
    exponential_moments,
    first_order_step,
    is_boundary_step,
    lagrange_weights,
    phi_functions,
    phi_sequence,
    step_order,
)
from .deis import DEIS
from .edm import Heun
from .linear_multistep import PNDM, LinearMultistep
from .momentum import GHVB, HeavyBall
from .multistep import MultistepDPMSolver, MultistepState
from .registry import ALIASES, REGISTRY, SolverInfo, configurations, get_solver, register
from .sde import AncestralSolver, MultistepSDESolver, SinglestepSDESolver
from .singlestep import FastDPMSolver, SinglestepDPMSolver
from .unipc import UniPC, UniPCState

__all__ = [
    "ALIASES",
    "DEIS",
    "GHVB",
    "PNDM",
    "REGISTRY",
    "AdaptiveDPMSolver",
    "AncestralSolver",
    "FastDPMSolver",
    "Form",
    "HeavyBall",
    "Heun",
    "LinearMultistep",
    "MultistepDPMSolver",
    "MultistepSDESolver",
    "MultistepState",
    "SinglestepDPMSolver",
    "SinglestepSDESolver",
    "Solver",
    "SolverInfo",
    "StepContext",
    "UniPC",
    "UniPCState",
    "boundary_update",
    "combine",
    "configurations",
    "exponential_moments",
    "first_order_step",
    "get_solver",
    "is_boundary_step",
    "lagrange_weights",
    "phi_functions",
    "phi_sequence",
    "register",
    "step_order",
]
