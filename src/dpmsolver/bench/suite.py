"""A suite of sampling problems with exact answers, split into selection and held-out parts.

Anything chosen from measurements (default recipes, tuned solvers, ``solver="auto"``) is
chosen on the *selection* problems only and scored on the *held-out* problems, which no
choice may look at. Each problem is an exact class-labelled Gaussian mixture with
low-rank-plus-diagonal covariances (:class:`~dpmsolver.analytic.LowRankMixture`) under one
of the schedules users have, so the exact (classifier-free-guided) denoiser and the exact
sample are known; a trained network fits the same interface (:class:`NetworkProblem`), with
a Dormand-Prince solution of its own ODE as the reference.

Why this split: both halves are stratified over the structure a choice could overfit, so
that each half alone spans it and a choice that works on one half has seen every kind of
problem the other half asks about -- schedule family (SD's discrete VP, continuous VP
linear and cosine, VE/EDM, rectified flow with and without shift), covariance type
(isotropic, diagonal, low-rank plus small diagonal, ill-conditioned), dimension (2 to
1024), number of components (2 to 50), near and far modes, data scale (std 0.3 to 3) and
the number of classes. ``test_suite.py`` checks that both halves cover every level of each
feature and share no problem. A third, smaller set of *fresh* problems was added after the
held-out half had been looked at many times (stop 21): it scores the default recipe's
final rule on problems no one had seen. Today's benchmark mixture (``mix16-sd``, the problem
``solver="auto"`` was chosen on) and the digits network are selection problems, since
choices were already made on them.

Every problem is built deterministically from its name (the seed is a CRC of the name), and
so is its default start noise; pass another ``seed`` to :meth:`Problem.noise` for noise a
choice never saw.

``python -m dpmsolver.bench.suite --quick`` prints the baseline: for every problem,
guidance scale and NFE, the best peer configuration (:mod:`.peer_suite`) against our
``dpmpp_2m``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..analytic import LowRankMixture, LowRankMixtureDenoiser, default_mixture
from ..denoiser import Denoiser
from ..schedules import (
    DiscreteVPSchedule,
    Knot,
    NoiseSchedule,
    RectifiedFlowSchedule,
    VESchedule,
)
from ..timegrid import GridKind
from .peers import optional_import
from .problem import (
    Problem,
    ReferenceCheck,
    ScheduleName,
    Split,
    make_schedule_named,
    name_seed,
    schedule_family,
)
from .records import command_line, publish, read_text, write_text

__all__ = [
    "FEATURES",
    "FRESH_ROUNDS",
    "GUIDANCE",
    "NFES",
    "SPECS",
    "BaselineRow",
    "MixtureProblem",
    "MixtureSpec",
    "NetworkProblem",
    "Problem",
    "ReferenceCheck",
    "baseline",
    "baseline_csv",
    "baseline_markdown",
    "digits_network_problem",
    "get_problem",
    "kept_commands",
    "main",
    "make_schedule_named",
    "rows_from_csv",
    "run_ours",
    "schedule_family",
    "suite_problems",
]

Covariance = Literal["isotropic", "diagonal", "lowrank", "illcond"]

GUIDANCE = (1.0, 3.0, 7.5, 15.0)
#: ``--ours default``: :func:`dpmsolver.sample`'s default solver for each schedule.
DEFAULT_OURS = "default"
NFES = (5, 6, 8, 10, 12, 15, 20, 25)


# --------------------------------------------------------------------------------------
# Exact mixture problems
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixtureSpec:
    """How to build one mixture problem.

    Attributes:
        name: problem name (and seed).
        split: ``"selection"``, ``"held_out"`` or ``"fresh"``.
        schedule: one of :func:`make_schedule_named`'s names.
        dim: data dimension D.
        components: number of mixture components K.
        classes: number of classes (components are labelled ``k % classes``).
        covariance: ``isotropic`` (``d_k`` constant per component), ``diagonal``,
            ``lowrank`` (rank-``rank`` factor plus a diagonal 1e-3 of the per-coordinate
            variance) or ``illcond`` (a diagonal spanning four decades plus a rank-``rank``
            factor; condition numbers 1e4-1e7).
        rank: rank r of the factors (0 for isotropic and diagonal).
        modes: ``near`` (mean separation about 2 component standard deviations) or
            ``far`` (about 8).
        data_std: the data's per-coordinate standard deviation after scaling.
        today: build ``default_mixture(16, 4 classes, 3 per class, seed 0)`` instead, the
            mixture today's benchmark (:mod:`.accuracy`) and ``solver="auto"`` used.
        fresh_round: the fresh round that scored this problem before it joined the
            selection half (0: none).
    """

    name: str
    split: Split
    schedule: ScheduleName
    dim: int
    components: int
    classes: int
    covariance: Covariance
    rank: int
    modes: Literal["near", "far"]
    data_std: float
    today: bool = False
    fresh_round: int = 0


def build_mixture(spec: MixtureSpec) -> LowRankMixture:
    """The mixture a spec describes, deterministic in ``spec.name``."""
    if spec.today:
        return LowRankMixture.from_diagonal(
            default_mixture(dim=16, num_classes=4, components_per_class=3, seed=0)
        )
    g = torch.Generator().manual_seed(name_seed(spec.name))
    k, d, r = spec.components, spec.dim, spec.rank
    f64 = torch.float64
    if spec.covariance == "isotropic":
        u = torch.zeros(k, d, 0, dtype=f64)
        diag = (0.5 + torch.rand(k, 1, generator=g, dtype=f64)).expand(k, d)
    elif spec.covariance == "diagonal":
        u = torch.zeros(k, d, 0, dtype=f64)
        diag = 0.2 + 0.8 * torch.rand(k, d, generator=g, dtype=f64)
    elif spec.covariance == "lowrank":
        u = torch.randn(k, d, r, generator=g, dtype=f64) / math.sqrt(r)
        diag = torch.full((k, d), 1e-3, dtype=f64)
    else:  # illcond
        u = torch.randn(k, d, r, generator=g, dtype=f64) / math.sqrt(r)
        # every component's diagonal spans exactly four decades, in a random order
        ramp = torch.linspace(0.0, 1.0, d, dtype=f64) if d > 1 else torch.zeros(1, dtype=f64)
        order = torch.stack([torch.randperm(d, generator=g) for _ in range(k)])
        diag = 10.0 ** (-4.0 * ramp[order])
    comp_std = math.sqrt(float(diag.mean() + (u**2).sum(-1).mean()))
    separation = 2.0 if spec.modes == "near" else 8.0
    means = torch.randn(k, d, generator=g, dtype=f64) * (separation * comp_std / math.sqrt(2 * d))
    weights = 0.5 + torch.rand(k, generator=g, dtype=f64)
    labels = torch.arange(k) % spec.classes
    mix = LowRankMixture(means, u, diag, weights, labels, spec.classes)
    c = spec.data_std / mix.data_std()
    return LowRankMixture(means * c, u * c, diag * c * c, weights, labels, spec.classes)


class MixtureProblem(Problem):
    """An exact problem: a :class:`~dpmsolver.analytic.LowRankMixture` under a schedule.

    Args:
        spec: what to build.
    """

    kind = "mixture"
    rtol = 1e-9
    loose_rtol = 1e-8

    def __init__(self, spec: MixtureSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.split = spec.split
        self.schedule = make_schedule_named(spec.schedule)
        self.mixture = build_mixture(spec)
        self.shape = self.mixture.shape
        self.num_classes = self.mixture.num_classes
        # condition number bound (exact for isotropic, diagonal and low-rank components):
        # lambda_max <= max d + ||U||_2^2, lambda_min >= min d
        mix = self.mixture
        top = mix.diag.amax(1)
        if mix.rank > 0:
            top = top + torch.linalg.matrix_norm(mix.factors, ord=2) ** 2
        condition = float((top / mix.diag.amin(1)).max())
        self.features = {
            "schedule": spec.schedule,
            "family": schedule_family(self.schedule),
            "dim": self.mixture.dim,
            "dim_band": _band(
                self.mixture.dim, (4, 32, 256), ("2-3", "8-32", "64-256", "512-1024")
            ),
            "components": self.mixture.means.shape[0],
            "components_band": _band(
                self.mixture.means.shape[0], (4, 25), ("2-4", "6-25", "40-50")
            ),
            "classes": self.num_classes,
            "covariance": "diagonal" if spec.today else spec.covariance,
            "rank": self.mixture.rank,
            "modes": "far" if spec.today else spec.modes,
            "data_std": self.mixture.data_std(),
            "scale_band": _band(self.mixture.data_std(), (0.6, 2.0), ("0.3-0.5", "1", "3")),
            "condition": condition,
        }
        # The reference may differ from the exact sample by a millionth of the data's scale.
        self.reference_tolerance = 1e-6 * self.mixture.data_std()

    def denoiser(self, guidance: float, labels: Tensor) -> Denoiser:
        """The exact guided denoiser (:class:`~dpmsolver.analytic.LowRankMixtureDenoiser`)."""
        return LowRankMixtureDenoiser(self.mixture, labels, guidance)


def _band(value: float, edges: Sequence[float], names: Sequence[str]) -> str:
    for edge, name in zip(edges, names, strict=False):
        if value < edge:
            return name
    return names[-1]


def _scored_in(fresh_round: int, *specs: MixtureSpec) -> tuple[MixtureSpec, ...]:
    """``specs`` as a finished fresh round: scored once, now selection problems."""
    return tuple(dataclasses.replace(s, fresh_round=fresh_round) for s in specs)


#: The suite. Both halves span every level of the structural features (stratified split);
#: see the module docstring for why.
SPECS: tuple[MixtureSpec, ...] = (
    # ---- selection: may be used to choose recipes, grids, solvers
    MixtureSpec("mix16-sd", "selection", "sd", 16, 12, 4, "diagonal", 0, "far", 0.5, today=True),
    MixtureSpec("iso2-vplin", "selection", "vp_linear", 2, 8, 4, "isotropic", 0, "far", 1.0),
    MixtureSpec("lowrank64-cos", "selection", "vp_cosine", 64, 6, 3, "lowrank", 4, "near", 1.0),
    MixtureSpec("ill256-edm", "selection", "edm", 256, 4, 2, "illcond", 2, "far", 0.3),
    MixtureSpec(
        "iso1024-flow3", "selection", "flow_shift3", 1024, 10, 5, "isotropic", 0, "near", 0.3
    ),
    MixtureSpec("lowrank32-flow", "selection", "flow", 32, 48, 8, "lowrank", 2, "near", 3.0),
    MixtureSpec("lowrank512-sd", "selection", "sd", 512, 20, 10, "lowrank", 8, "far", 3.0),
    MixtureSpec("ill3-vplin", "selection", "vp_linear", 3, 2, 2, "illcond", 1, "near", 0.3),
    # four more rectified-flow problems (added at stop 21): with two, a flow-only choice
    # could not be tested by leaving one problem out
    MixtureSpec("diag16-flow", "selection", "flow", 16, 8, 4, "diagonal", 0, "far", 0.5),
    MixtureSpec("ill32-flow3", "selection", "flow_shift3", 32, 6, 3, "illcond", 1, "far", 1.0),
    MixtureSpec("iso4-flow3", "selection", "flow_shift3", 4, 12, 4, "isotropic", 0, "near", 3.0),
    MixtureSpec("lowrank128-flow", "selection", "flow", 128, 10, 5, "lowrank", 4, "far", 0.3),
    # the first fresh round (stop 21): scored once as unseen problems, then moved here
    *_scored_in(
        1,
        MixtureSpec("diag8-sd", "selection", "sd", 8, 6, 3, "diagonal", 0, "near", 1.0),
        MixtureSpec("iso256-sd", "selection", "sd", 256, 8, 4, "isotropic", 0, "far", 0.3),
        MixtureSpec(
            "lowrank64-vplin", "selection", "vp_linear", 64, 16, 4, "lowrank", 3, "far", 0.5
        ),
        MixtureSpec("ill32-cos", "selection", "vp_cosine", 32, 5, 5, "illcond", 1, "far", 3.0),
        MixtureSpec("diag4-edm", "selection", "edm", 4, 10, 2, "diagonal", 0, "near", 0.3),
        MixtureSpec("lowrank128-edm", "selection", "edm", 128, 4, 4, "lowrank", 2, "near", 3.0),
        MixtureSpec(
            "lowrank16-flow3", "selection", "flow_shift3", 16, 20, 5, "lowrank", 2, "far", 1.0
        ),
        MixtureSpec("ill8-flow", "selection", "flow", 8, 6, 3, "illcond", 1, "near", 0.5),
    ),
    # the second fresh round (stop 21): scored once as unseen problems, then (stop 38) moved
    # here
    *_scored_in(
        2,
        MixtureSpec("lowrank32-sd", "selection", "sd", 32, 12, 6, "lowrank", 2, "near", 0.5),
        MixtureSpec("ill4-vplin", "selection", "vp_linear", 4, 6, 3, "illcond", 1, "far", 1.0),
        MixtureSpec("diag128-cos", "selection", "vp_cosine", 128, 8, 4, "diagonal", 0, "near", 0.3),
        MixtureSpec("iso64-edm", "selection", "edm", 64, 12, 3, "isotropic", 0, "far", 0.5),
        MixtureSpec("ill16-edm", "selection", "edm", 16, 6, 2, "illcond", 2, "near", 1.0),
        MixtureSpec("diag32-flow", "selection", "flow", 32, 10, 5, "diagonal", 0, "far", 3.0),
        MixtureSpec(
            "lowrank64-flow3", "selection", "flow_shift3", 64, 8, 4, "lowrank", 3, "near", 0.3
        ),
        MixtureSpec("iso4-flow", "selection", "flow", 4, 16, 4, "isotropic", 0, "far", 1.0),
    ),
    # the third fresh round (stop 38; defined before the step-limit study of the default,
    # benchmarks/policy_step_limit.md): scored once as unseen problems, then (stop 58) moved
    # here
    *_scored_in(
        3,
        MixtureSpec("diag512-sd", "selection", "sd", 512, 8, 4, "diagonal", 0, "far", 1.0),
        MixtureSpec("iso16-cos", "selection", "vp_cosine", 16, 6, 3, "isotropic", 0, "near", 0.5),
        MixtureSpec(
            "lowrank8-vplin", "selection", "vp_linear", 8, 20, 5, "lowrank", 2, "near", 3.0
        ),
        MixtureSpec("ill64-edm", "selection", "edm", 64, 10, 5, "illcond", 2, "near", 0.3),
        MixtureSpec("diag2-edm", "selection", "edm", 2, 6, 3, "diagonal", 0, "far", 3.0),
        MixtureSpec("ill128-flow", "selection", "flow", 128, 4, 2, "illcond", 3, "far", 1.0),
        MixtureSpec(
            "iso32-flow3", "selection", "flow_shift3", 32, 25, 5, "isotropic", 0, "far", 0.5
        ),
        MixtureSpec(
            "lowrank512-flow3", "selection", "flow_shift3", 512, 6, 3, "lowrank", 4, "near", 0.3
        ),
    ),
    # the fourth fresh round (stop 58; benchmarks/policy_round4.md): scored once as unseen
    # problems, then (stop 59) moved here
    *_scored_in(
        4,
        MixtureSpec("iso64-sd", "selection", "sd", 64, 10, 5, "isotropic", 0, "near", 3.0),
        MixtureSpec("ill24-sd", "selection", "sd", 24, 8, 4, "illcond", 2, "far", 0.5),
        MixtureSpec("diag32-vplin", "selection", "vp_linear", 32, 12, 4, "diagonal", 0, "far", 1.0),
        MixtureSpec(
            "lowrank256-cos", "selection", "vp_cosine", 256, 6, 3, "lowrank", 5, "near", 1.0
        ),
        MixtureSpec("iso128-edm", "selection", "edm", 128, 20, 5, "isotropic", 0, "near", 3.0),
        MixtureSpec("lowrank16-edm", "selection", "edm", 16, 8, 4, "lowrank", 3, "far", 0.3),
        MixtureSpec(
            "ill64-flow3", "selection", "flow_shift3", 64, 12, 4, "illcond", 2, "near", 1.0
        ),
        MixtureSpec("diag256-flow", "selection", "flow", 256, 6, 3, "diagonal", 0, "near", 0.3),
    ),
    # the fifth fresh round (stop 59; benchmarks/policy_round5.md): scored once as unseen
    # problems, then (stop 60) moved here
    *_scored_in(
        5,
        MixtureSpec("diag1024-sd", "selection", "sd", 1024, 6, 3, "diagonal", 0, "far", 1.0),
        MixtureSpec("lowrank8-sd", "selection", "sd", 8, 16, 4, "lowrank", 2, "near", 3.0),
        MixtureSpec("ill256-vplin", "selection", "vp_linear", 256, 8, 4, "illcond", 3, "near", 0.5),
        MixtureSpec("iso32-cos", "selection", "vp_cosine", 32, 12, 6, "isotropic", 0, "far", 1.0),
        MixtureSpec("diag16-edm", "selection", "edm", 16, 10, 5, "diagonal", 0, "near", 1.0),
        MixtureSpec("lowrank512-edm", "selection", "edm", 512, 6, 3, "lowrank", 8, "far", 3.0),
        MixtureSpec(
            "iso16-flow3", "selection", "flow_shift3", 16, 8, 4, "isotropic", 0, "near", 3.0
        ),
        MixtureSpec("ill16-flow", "selection", "flow", 16, 12, 4, "illcond", 2, "far", 0.3),
    ),
    # the sixth fresh round (stop 60; benchmarks/policy_round6.md): scored once as unseen
    # problems, then (stop 61) moved here
    *_scored_in(
        6,
        MixtureSpec("ill128-sd", "selection", "sd", 128, 10, 5, "illcond", 3, "near", 1.0),
        MixtureSpec("diag64-vplin", "selection", "vp_linear", 64, 8, 4, "diagonal", 0, "near", 3.0),
        MixtureSpec(
            "iso512-vplin", "selection", "vp_linear", 512, 6, 3, "isotropic", 0, "far", 0.5
        ),
        MixtureSpec("lowrank16-cos", "selection", "vp_cosine", 16, 4, 2, "lowrank", 2, "far", 0.3),
        MixtureSpec("ill32-edm", "selection", "edm", 32, 8, 4, "illcond", 2, "far", 3.0),
        MixtureSpec("diag256-edm", "selection", "edm", 256, 40, 8, "diagonal", 0, "near", 0.5),
        MixtureSpec(
            "lowrank32-flow3", "selection", "flow_shift3", 32, 10, 5, "lowrank", 3, "far", 3.0
        ),
        MixtureSpec("iso64-flow", "selection", "flow", 64, 20, 5, "isotropic", 0, "near", 1.0),
    ),
    # the seventh fresh round (stop 61; benchmarks/policy_round7.md): scored once as unseen
    # problems, then (stop 62) moved here
    *_scored_in(
        7,
        MixtureSpec("diag16-sd", "selection", "sd", 16, 6, 3, "diagonal", 0, "near", 0.3),
        MixtureSpec(
            "lowrank128-vplin", "selection", "vp_linear", 128, 10, 5, "lowrank", 4, "near", 1.0
        ),
        MixtureSpec("ill64-cos", "selection", "vp_cosine", 64, 8, 4, "illcond", 2, "far", 0.5),
        MixtureSpec("iso16-edm", "selection", "edm", 16, 6, 3, "isotropic", 0, "near", 1.0),
        MixtureSpec("lowrank64-edm", "selection", "edm", 64, 20, 5, "lowrank", 3, "far", 0.5),
        MixtureSpec("diag128-flow", "selection", "flow", 128, 10, 5, "diagonal", 0, "far", 1.0),
        MixtureSpec("lowrank8-flow", "selection", "flow", 8, 12, 4, "lowrank", 2, "near", 3.0),
        MixtureSpec(
            "ill256-flow3", "selection", "flow_shift3", 256, 6, 3, "illcond", 2, "far", 0.3
        ),
    ),
    # the eighth fresh round (stop 62): scored once as unseen problems, then (stop 63) moved
    # here
    *_scored_in(
        8,
        MixtureSpec("lowrank256-sd", "selection", "sd", 256, 12, 4, "lowrank", 6, "near", 1.0),
        MixtureSpec("iso8-vplin", "selection", "vp_linear", 8, 10, 5, "isotropic", 0, "near", 0.5),
        MixtureSpec("diag32-cos", "selection", "vp_cosine", 32, 16, 4, "diagonal", 0, "far", 3.0),
        MixtureSpec("ill128-edm", "selection", "edm", 128, 6, 3, "illcond", 2, "near", 0.5),
        MixtureSpec("iso256-edm", "selection", "edm", 256, 8, 4, "isotropic", 0, "far", 0.3),
        MixtureSpec("lowrank64-flow", "selection", "flow", 64, 16, 4, "lowrank", 3, "near", 1.0),
        MixtureSpec("ill32-flow", "selection", "flow", 32, 8, 4, "illcond", 2, "far", 3.0),
        MixtureSpec(
            "diag512-flow3", "selection", "flow_shift3", 512, 10, 5, "diagonal", 0, "near", 1.0
        ),
    ),
    # ---- held out: never used to choose anything; the README reports on these
    MixtureSpec("iso2-sd", "held_out", "sd", 2, 25, 5, "isotropic", 0, "far", 3.0),
    MixtureSpec("lowrank256-vplin", "held_out", "vp_linear", 256, 12, 4, "lowrank", 6, "far", 0.3),
    MixtureSpec("ill16-cos", "held_out", "vp_cosine", 16, 3, 3, "illcond", 1, "near", 3.0),
    MixtureSpec("lowrank1024-edm", "held_out", "edm", 1024, 8, 4, "lowrank", 16, "near", 1.0),
    MixtureSpec("diag64-flow3", "held_out", "flow_shift3", 64, 40, 10, "diagonal", 0, "near", 0.5),
    MixtureSpec("iso8-flow", "held_out", "flow", 8, 4, 2, "isotropic", 0, "far", 1.0),
    MixtureSpec("lowrank128-sd", "held_out", "sd", 128, 50, 5, "lowrank", 3, "near", 0.3),
    MixtureSpec("ill512-edm", "held_out", "edm", 512, 6, 3, "illcond", 2, "far", 1.0),
    # ---- fresh (stop 63, ninth round): defined before the default was re-chosen with the
    # eighth round in the selection half (benchmarks/policy_round9.md), and scored once;
    # never used to choose anything
    MixtureSpec("diag64-sd", "fresh", "sd", 64, 10, 5, "diagonal", 0, "far", 0.5),
    MixtureSpec("ill64-vplin", "fresh", "vp_linear", 64, 8, 4, "illcond", 2, "near", 3.0),
    MixtureSpec("lowrank32-cos", "fresh", "vp_cosine", 32, 12, 4, "lowrank", 3, "far", 0.5),
    MixtureSpec("diag64-edm", "fresh", "edm", 64, 12, 4, "diagonal", 0, "far", 3.0),
    MixtureSpec("lowrank256-edm", "fresh", "edm", 256, 10, 5, "lowrank", 4, "near", 0.3),
    MixtureSpec("iso32-flow", "fresh", "flow", 32, 6, 3, "isotropic", 0, "near", 0.5),
    MixtureSpec("lowrank16-flow", "fresh", "flow", 16, 20, 5, "lowrank", 2, "far", 1.0),
    MixtureSpec("diag128-flow3", "fresh", "flow_shift3", 128, 8, 4, "diagonal", 0, "far", 3.0),
)

#: Fresh rounds already scored, in order: each tuple's problems were defined before a
#: rule was chosen without them, scored once as fresh problems, then moved to the
#: selection half.
FRESH_ROUNDS: tuple[tuple[str, ...], ...] = tuple(
    tuple(s.name for s in SPECS if s.fresh_round == i)
    for i in range(1, max(s.fresh_round for s in SPECS) + 1)
)

#: The structural features the split is stratified over (each level in both halves).
FEATURES: tuple[str, ...] = (
    "family",
    "schedule",
    "covariance",
    "dim_band",
    "components_band",
    "modes",
    "scale_band",
)

_CACHE: dict[str, Problem] = {}


def get_problem(name: str) -> Problem:
    """A suite problem by name (built once per process), including network problems."""
    if name not in _CACHE:
        specs = {s.name: s for s in SPECS}
        if name in specs:
            _CACHE[name] = MixtureProblem(specs[name])
        elif name in NETWORK_PROBLEMS:
            _CACHE[name] = NETWORK_PROBLEMS[name]()
        else:
            known = ", ".join([*specs, *NETWORK_PROBLEMS])
            raise ValueError(f"unknown problem {name!r}; known: {known}")
    return _CACHE[name]


def suite_problems(split: Split | None = None) -> list[Problem]:
    """The exact problems of the suite (one split, or both), in :data:`SPECS` order."""
    return [get_problem(s.name) for s in SPECS if split is None or s.split == split]


# --------------------------------------------------------------------------------------
# Trained networks
# --------------------------------------------------------------------------------------


class NetworkProblem(Problem):
    """A trained network as a suite problem: its classifier-free-guided denoiser (null
    label for the unconditional branch), and as reference the Dormand-Prince solution of
    its own probability-flow ODE at a tight tolerance followed by its data prediction.

    Args:
        name: problem name.
        split: ``"selection"``, ``"held_out"`` or ``"fresh"``.
        load: ``load(device) -> network`` called once, ``network(x, t, y=labels)``.
        schedule: the network's schedule.
        prediction: its output (``eps``, ``x0``, ``v``, ``flow``...).
        shape: per-sample shape.
        num_classes: labels ``0..num_classes-1``.
        null_label: the label of the unconditional branch.
        rtol, loose_rtol: the reference's tolerances (default 1e-6, 1e-5: the network's
            float32 arithmetic limits how close two solves can agree).
        reference_tolerance: accepted RMS difference between them (default 1e-4).
        device: where the network runs (default CPU).
    """

    kind = "network"

    def __init__(
        self,
        name: str,
        split: Split,
        load: Callable[[torch.device], Callable[..., Tensor]],
        schedule: NoiseSchedule,
        prediction: str,
        shape: tuple[int, ...],
        num_classes: int,
        null_label: int,
        *,
        rtol: float = 1e-6,
        loose_rtol: float = 1e-5,
        reference_tolerance: float = 1e-4,
        device: torch.device | str = "cpu",
        features: dict[str, Any] | None = None,
    ) -> None:
        self.name, self.split, self.schedule = name, split, schedule
        self.prediction, self.shape = prediction, tuple(shape)
        self.num_classes, self.null_label = num_classes, null_label
        self.rtol, self.loose_rtol, self.reference_tolerance = rtol, loose_rtol, reference_tolerance
        self.device = torch.device(device)
        self._load = load
        self._network: Callable[..., Tensor] | None = None
        self.features = {"family": schedule_family(schedule), "network": True, **(features or {})}

    @property
    def network(self) -> Callable[..., Tensor]:
        """The network (loaded on first use)."""
        if self._network is None:
            self._network = self._load(self.device)
        return self._network

    def noise(
        self, n: int, seed: int | None = None, *, device: torch.device | str | None = None
    ) -> Tensor:
        """As :meth:`Problem.noise`, on the problem's device by default."""
        return super().noise(n, seed, device=self.device if device is None else device)

    def denoiser(self, guidance: float, labels: Tensor) -> Denoiser:
        """The network's guided denoiser; float32 network, float64 state."""
        from ..sampling import build_denoiser

        y = labels.to(self.device)
        den = build_denoiser(
            self.network,
            prediction=self.prediction,  # type: ignore[arg-type]
            cond={"y": y},
            uncond={"y": torch.full_like(y, self.null_label)},
            guidance_scale=guidance,
        )

        def den64(x: Tensor, knot: Knot) -> Tensor:
            with torch.no_grad():
                return den(x.float(), knot).double()

        return den64


def _digits_problem(
    name: str,
    split: Split,
    loader: str,
    schedule: NoiseSchedule,
    prediction: str,
    schedule_name: str,
    device: torch.device | str,
) -> NetworkProblem:
    """One of the shipped digits models (8x8, 10 classes, null label 10) as a suite problem;
    ``loader`` names its function in :mod:`dpmsolver.digits`."""

    def load(dev: torch.device) -> Callable[..., Tensor]:
        from .. import digits

        return getattr(digits, loader)(dev)

    features = {"schedule": schedule_name, "dim": 64, "data_std": 0.6}
    return NetworkProblem(
        name, split, load, schedule, prediction, (1, 8, 8), 10, 10, device=device, features=features
    )


def digits_network_problem(device: torch.device | str = "cpu") -> NetworkProblem:
    """The built-in digits U-Net (eps prediction, SD's discrete VP) as a suite problem. A
    selection problem: benchmarks already chose things on it."""
    sched = DiscreteVPSchedule()
    return _digits_problem(
        "digits-unet-sd", "selection", "load_default_model", sched, "eps", "sd", device
    )


def flow_network_problem(device: torch.device | str = "cpu") -> NetworkProblem:
    """The built-in rectified-flow digits transformer (``builtin-flow``: flow prediction,
    shift 0.5) as a suite problem. Held out: nothing was chosen on it."""
    from ..digits import FLOW_SCHEDULE

    sched = RectifiedFlowSchedule(shift=FLOW_SCHEDULE["shift"])
    return _digits_problem(
        "digits-dit-flow", "held_out", "load_flow_model", sched, "flow", "flow", device
    )


def edm_network_problem(device: torch.device | str = "cpu") -> NetworkProblem:
    """The built-in EDM digits U-Net (``builtin-edm``: VE, data prediction) as a suite
    problem. Held out: nothing was chosen on it."""
    from ..digits import EDM_SCHEDULE

    sched = VESchedule(EDM_SCHEDULE["sigma_min"], EDM_SCHEDULE["sigma_max"])
    return _digits_problem(
        "digits-unet-edm", "held_out", "load_edm_model", sched, "x0", "edm", device
    )


#: Network problems by name (the three shipped digits models).
NETWORK_PROBLEMS: dict[str, Callable[[], NetworkProblem]] = {
    "digits-unet-sd": digits_network_problem,
    "digits-dit-flow": flow_network_problem,
    "digits-unet-edm": edm_network_problem,
}


# --------------------------------------------------------------------------------------
# Our solver, and the baseline driver
# --------------------------------------------------------------------------------------


class _DenoiserNetwork:
    """A denoiser presented as an ``x0``-predicting network ``net(x, t)`` so that it runs
    through :func:`dpmsolver.sample` exactly as a user's network would."""

    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule) -> None:
        self.denoiser, self.schedule = denoiser, schedule

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        tt = float(self.schedule.t_of_model_time(t.flatten()[:1].double().cpu()))
        return self.denoiser(x, self.schedule.knot(min(max(tt, 0.0), self.schedule.t_max)))


def run_ours(
    problem: Problem,
    denoiser: Denoiser,
    x_T: Tensor,
    nfe: int,
    *,
    solver: str | None = "dpmpp_2m",
    grid: GridKind | None = None,
    guidance: float = 1.0,
) -> tuple[Tensor | None, int]:
    """Our ``solver`` (None: what :func:`dpmsolver.sample` runs with no solver named, for
    the schedule and the ``guidance`` scale the denoiser applies) through
    :func:`dpmsolver.sample` at ``nfe`` evaluations on its default grid (``grid`` to
    override). Returns the final sample (None if it went non-finite) and the
    evaluations."""
    from ..recipe import default_solver
    from ..sampling import NonFiniteError, sample

    if solver is None:  # the guidance is inside the denoiser, so sample() cannot see it
        solver = default_solver(problem.schedule, guidance)

    net = _DenoiserNetwork(denoiser, problem.schedule)
    z = x_T / problem.schedule.knot(problem.schedule.t_max).sigma
    try:
        res = sample(
            net, z, schedule=problem.schedule, prediction="x0", solver=solver, nfe=nfe, grid=grid
        )
    except NonFiniteError:
        return None, -1
    return res.x, res.nfe


def _rms(a: Tensor, b: Tensor) -> float:
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


@dataclass
class BaselineRow:
    """One cell of the baseline: a problem, guidance scale and NFE.

    Attributes:
        ours: RMS error of ours (``ours_label``: a solver name, or ``default`` for
            :func:`dpmsolver.sample`'s default) against the exact sample.
        best_peer, best_label: the best peer configuration's error and label.
        peers_run: configurations that could spend exactly ``nfe``.
        reference_error: the reference's two-tolerance difference.
        errors: every peer configuration's error (by label).
        reference_evals, reference_seconds: what the two reference solves cost (shared by
            the NFEs of one problem and guidance scale).
        seconds: this cell's share of the time its problem and guidance scale took.
    """

    problem: str
    split: str
    family: str
    guidance: float
    nfe: int
    ours: float
    best_peer: float
    best_label: str
    peers_run: int
    reference_error: float
    data_std: float
    errors: dict[str, float] = field(default_factory=dict, repr=False)
    reference_evals: int = 0
    reference_seconds: float = 0.0
    seconds: float = 0.0
    ours_label: str = "dpmpp_2m"


def baseline(
    problems: Iterable[Problem],
    *,
    guidances: Sequence[float] = GUIDANCE,
    nfes: Sequence[int] = NFES,
    batch: int = 64,
    configs: Sequence[Any] | None = None,
    ours: str = "dpmpp_2m",
    log: Callable[[str], None] | None = None,
) -> list[BaselineRow]:
    """Our ``ours`` (a solver name, or ``"default"``: :func:`dpmsolver.sample`'s default
    for the schedule) against every applicable peer configuration
    (:func:`~.peer_suite.peer_configs`) on each problem, guidance scale and NFE; all start
    from the problem's default noise and are scored by RMS error against the exact sample.
    Raises if a reference fails its two-tolerance check."""
    from .peer_suite import run_peers

    solver = None if ours == DEFAULT_OURS else ours  # None: sample's default
    rows: list[BaselineRow] = []
    for p in problems:
        labels = p.labels(batch)
        x_T = p.x_T(p.noise(batch))
        for w in guidances:
            t0 = time.perf_counter()
            den = p.denoiser(w, labels)
            check = p.check_reference(den, x_T)
            if not check.passed:
                raise RuntimeError(
                    f"{p.name} w={w:g}: reference tolerances disagree by {check.error:.2e} "
                    f"(> {check.tolerance:.2e})"
                )
            ref = check.sample
            first = len(rows)
            for nfe in nfes:
                x, _ = run_ours(p, den, x_T, nfe, solver=solver, guidance=w)
                mine = math.inf if x is None else _rms(x, ref)
                errors = {
                    r.label: _rms(r.sample, ref)
                    for r in run_peers(p, w, labels, x_T, nfe, configs=configs, denoiser=den)
                    if r.sample is not None
                }
                best = min(errors.items(), key=lambda kv: kv[1], default=("none", math.inf))
                rows.append(
                    BaselineRow(
                        p.name,
                        p.split,
                        p.family,
                        w,
                        nfe,
                        mine,
                        best[1],
                        best[0],
                        len(errors),
                        check.error,
                        p.data_std,
                        errors,
                        ours_label=ours,
                    )
                )
            took = time.perf_counter() - t0
            for r in rows[first:]:
                r.reference_evals, r.reference_seconds = check.evaluations, check.seconds
                r.seconds = took / len(nfes)
            if log is not None:
                log(
                    f"{p.name} w={w:g}: reference {check.evaluations} evals, error "
                    f"{check.error:.1e} ({check.seconds:.1f} s); cell total "
                    f"{time.perf_counter() - t0:.1f} s"
                )
    return rows


def _geomean(values: Sequence[float]) -> str:
    """Geometric mean of the finite values, as a table cell."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if not finite:
        return "-"
    return f"{math.exp(sum(math.log(v) for v in finite) / len(finite)):.2f}"


def baseline_markdown(rows: Sequence[BaselineRow], problems: Sequence[Problem]) -> str:
    """The baseline as markdown: summaries of ``ours / best peer`` (by split, NFE, family
    and guidance), the winning peers, the problems, and one row per cell per problem."""
    cells = [r for r in rows if math.isfinite(r.best_peer)]
    label = _ours_label(rows)
    out = [f"## Summary: our {label}'s error / the best peer's error\n"]
    out.append(
        "Geometric means over cells (a cell: problem, guidance, NFE); < 1 means ours is more "
        'accurate. "ours better" / "tied" count cells where ours is more accurate by more '
        'than 1% / within 1%; "ours > 10x" cells where ours is over ten times less '
        "accurate.\n"
    )
    out.append(
        "| split | cells | geo-mean | median | worst | ours better | tied | ours > 10x "
        "| ours non-finite |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|")
    for split in ("selection", "held_out", "fresh", "all"):
        ratios = sorted(_ratio(r) for r in cells if split in ("all", r.split))
        if not ratios:
            continue
        nonfinite = sum(not math.isfinite(v) for v in ratios)
        out.append(
            f"| {split} | {len(ratios)} | {_geomean(ratios)} | {ratios[len(ratios) // 2]:.2f} "
            f"| {ratios[-1]:.3g} | {sum(v < 0.99 for v in ratios)} "
            f"| {sum(0.99 <= v <= 1.01 for v in ratios)} | {sum(v > 10 for v in ratios)} "
            f"| {nonfinite} |"
        )
    for title, key, values in (
        ("NFE", "nfe", sorted({r.nfe for r in cells})),
        ("schedule family", "family", sorted({r.family for r in cells})),
        ("guidance", "guidance", sorted({r.guidance for r in cells})),
    ):
        out.append(f"\n### By {title} (geometric mean of ours / best peer)\n")
        out.append(
            "| split | "
            + " | ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
            + " |"
        )
        out.append("|---|" + "---|" * len(values))
        for split in ("selection", "held_out", "fresh"):
            if not any(r.split == split for r in cells):
                continue
            out.append(
                f"| {split} | "
                + " | ".join(
                    _geomean(
                        [_ratio(r) for r in cells if r.split == split and getattr(r, key) == v]
                    )
                    for v in values
                )
                + " |"
            )
    wins: dict[str, int] = {}
    for r in cells:
        wins[r.best_label] = wins.get(r.best_label, 0) + 1
    out.append("\n### Best peer configurations (cells won)\n")
    out.append("| configuration | cells |")
    out.append("|---|---|")
    for winner, n in sorted(wins.items(), key=lambda kv: -kv[1])[:20]:
        out.append(f"| {winner} | {n} |")
    out += _fixed_peer_section(cells)
    out.append("\n## Problems\n")
    out.append(
        "| problem | split | schedule | dim | K | classes | covariance | rank | modes "
        "| data std | cond <= |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in problems:
        f = p.features
        cond = float(f.get("condition", math.nan))
        out.append(
            f"| {p.name} | {p.split} | {f.get('schedule', '')} | {f.get('dim', '')} "
            f"| {f.get('components', '')} | {p.num_classes} | {f.get('covariance', '')} "
            f"| {f.get('rank', '')} | {f.get('modes', '')} | {p.data_std:.2f} "
            f"| {'-' if not math.isfinite(cond) else f'{cond:.1e}'} |"
        )
    if any(r.seconds > 0 for r in rows):
        out.append("\n## Timing (one CPU thread)\n")
        out.append("| problem | reference evaluations (per guidance) | reference s | total s |")
        out.append("|---|---|---|---|")
        for p in problems:
            rs = [r for r in rows if r.problem == p.name]
            if not any(r.seconds > 0 for r in rs):  # reused from a recorded run
                continue
            by_w = {r.guidance: r for r in rs}
            evals = ", ".join(str(r.reference_evals) for r in by_w.values())
            ref_s = sum(r.reference_seconds for r in by_w.values())
            out.append(f"| {p.name} | {evals} | {ref_s:.0f} | {sum(r.seconds for r in rs):.0f} |")
    for p in problems:
        rs = [r for r in rows if r.problem == p.name]
        if not rs:
            continue
        ref_err = max(r.reference_error for r in rs)
        out.append(
            f"\n### {p.name} ({p.split}, {p.family}; data std {p.data_std:.2f}; reference "
            f"tolerance difference <= {ref_err:.1e})\n"
        )
        out.append(
            f"| w | NFE | ours ({label}) | best peer | ours / peer | best peer configuration "
            "| peers run |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for r in rs:
            out.append(
                f"| {r.guidance:g} | {r.nfe} | {r.ours:.2e} | {r.best_peer:.2e} "
                f"| {_ratio(r):.2f} | {r.best_label} | {r.peers_run} |"
            )
    return "\n".join(out) + "\n"


CSV_COLUMNS = "problem,split,family,guidance,nfe,method,error,reference_error,data_std"


def _fixed_peer_section(cells: Sequence[BaselineRow]) -> list[str]:
    """The best peer of each cell is an oracle over ~55 configurations. The fairer
    opponent: per schedule family, the one peer configuration that does best on the
    selection half (geometric mean of its error over the per-cell best, among those that
    can spend every NFE), scored on the held-out half."""
    out = [
        "\n### One peer configuration per family, chosen on the selection half\n",
        "The per-cell best peer above is an oracle (the best of ~55 configurations in each "
        "cell). Here one configuration per schedule family is chosen on the selection cells "
        "(smallest geometric mean of its error / the cell's best; only configurations that "
        "spend every NFE) and scored on the held-out cells.\n",
        "| family | chosen on selection | selection: it / oracle | held out: it / oracle "
        "| held out: ours / it | held out: ours / oracle |",
        "|---|---|---|---|---|---|",
    ]
    for family in sorted({r.family for r in cells}):
        sel = [r for r in cells if r.family == family and r.split == "selection"]
        held = [r for r in cells if r.family == family and r.split == "held_out"]
        if not sel or not held:
            continue
        common = set.intersection(*(set(r.errors) for r in sel))
        if not common:
            continue

        def score(label: str, rows: Sequence[BaselineRow]) -> float:
            vals = [r.errors.get(label, math.inf) / max(r.best_peer, 1e-300) for r in rows]
            if not all(math.isfinite(v) and v > 0 for v in vals):
                return math.inf
            return math.exp(sum(math.log(v) for v in vals) / len(vals))

        label = min(sorted(common), key=lambda c: score(c, sel))
        mine = [r.ours / max(r.errors.get(label, math.inf), 1e-300) for r in held]
        out.append(
            f"| {family} | {label} | {score(label, sel):.2f} | {score(label, held):.2f} "
            f"| {_geomean(mine)} | {_geomean([_ratio(r) for r in held])} |"
        )
    return out


def baseline_csv(rows: Sequence[BaselineRow]) -> str:
    """Every error of every cell as CSV (:data:`CSV_COLUMNS`; ours is the method ``ours
    <label>``, e.g. ``ours dpmpp_2m``)."""
    lines = [CSV_COLUMNS]
    for r in rows:
        head = f"{r.problem},{r.split},{r.family},{r.guidance:g},{r.nfe}"
        tail = f"{r.reference_error:.3g},{r.data_std:.6g}"
        lines.append(f"{head},ours {r.ours_label},{r.ours:.4g},{tail}")
        for label, err in r.errors.items():
            lines.append(f"{head},{label},{err:.4g},{tail}")
    return "\n".join(lines) + "\n"


def rows_from_csv(text: str) -> list[BaselineRow]:
    """The rows :func:`baseline_csv` wrote (to re-render or re-analyse a run)."""
    lines = text.strip().splitlines()
    if lines[0] != CSV_COLUMNS:
        raise ValueError(f"expected the header {CSV_COLUMNS!r}")
    cells: dict[tuple[str, float, int], BaselineRow] = {}
    for line in lines[1:]:
        problem, split, family, w, nfe, method, err, ref_err, std = line.split(",")
        key = (problem, float(w), int(nfe))
        if key not in cells:
            cells[key] = BaselineRow(
                problem,
                split,
                family,
                float(w),
                int(nfe),
                math.inf,
                math.inf,
                "none",
                0,
                float(ref_err),
                float(std),
            )
        row = cells[key]
        if method.startswith("ours "):
            row.ours, row.ours_label = float(err), method.removeprefix("ours ")
        else:
            row.errors[method] = float(err)
    for row in cells.values():
        row.peers_run = len(row.errors)
        if row.errors:
            row.best_label, row.best_peer = min(row.errors.items(), key=lambda kv: kv[1])
    return list(cells.values())


def _ours_label(rows: Sequence[BaselineRow]) -> str:
    """What the rows' "ours" is (``dpmpp_2m``, ``default``, ...)."""
    labels = sorted({r.ours_label for r in rows}) or ["dpmpp_2m"]
    return "/".join(labels)


def _ratio(r: BaselineRow) -> float:
    if not math.isfinite(r.ours):
        return math.inf
    return max(r.ours, 1e-300) / max(r.best_peer, 1e-300)


def kept_commands(out: str | None) -> str | None:
    """The hand-kept ``Commands:`` paragraph of an existing record at ``out`` (the history
    of the runs that measured its problems, which a new run's one-line ``Command:`` would
    overwrite), or None."""
    if out is None or not Path(out).is_file():
        return None
    for paragraph in Path(out).read_text().split("\n\n"):
        if paragraph.startswith("Commands:"):
            return paragraph
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolver.bench.suite [--quick] [--out FILE.md] [--csv FILE.csv] ...``:
    the baseline table as markdown on stdout (and in ``--out``), every error in ``--csv``."""
    ap = argparse.ArgumentParser(prog="python -m dpmsolver.bench.suite", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="64 samples per problem")
    ap.add_argument("--batch", type=int, default=None, help="samples per problem (default 256)")
    ap.add_argument("--problems", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--split", choices=("selection", "held_out", "fresh"), default=None)
    ap.add_argument("--guidance", default=None, help="comma-separated (default 1,3,7.5,15)")
    ap.add_argument("--nfe", default=None, help="comma-separated (default 5,...,25)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument(
        "--csv", default=None, help="write every configuration's error here (.gz: gzipped)"
    )
    ap.add_argument(
        "--ours",
        default="dpmpp_2m",
        help="our solver in the table: a registry name, or 'default' for what "
        "dpmsolver.sample runs with no solver named (default dpmpp_2m)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--from-csv", default=None, help="re-render a run's CSV; run nothing")
    ap.add_argument(
        "--reuse", default=None, help="keep this CSV's problems as they are; run only the others"
    )
    args = ap.parse_args(argv)
    if args.from_csv:
        old_rows = rows_from_csv(read_text(args.from_csv))
        names = list(dict.fromkeys(r.problem for r in old_rows))
        print(baseline_markdown(old_rows, [get_problem(n) for n in names]))
        return 0
    torch.set_num_threads(args.threads)
    diffusers = optional_import("diffusers")
    if diffusers is not None:  # its schedulers warn on every construction in some configs
        diffusers.utils.logging.set_verbosity_error()
    batch = args.batch or (64 if args.quick else 256)
    if args.problems:
        problems = [get_problem(n.strip()) for n in args.problems.split(",")]
    else:
        problems = suite_problems(args.split)
    guid = tuple(float(v) for v in args.guidance.split(",")) if args.guidance else GUIDANCE
    nfes = tuple(int(v) for v in args.nfe.split(",")) if args.nfe else NFES
    old = rows_from_csv(read_text(args.reuse)) if args.reuse else []
    kept = {r.problem for r in old}
    start = time.perf_counter()
    rows = baseline(
        [p for p in problems if p.name not in kept],
        guidances=guid,
        nfes=nfes,
        batch=batch,
        ours=args.ours,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    seconds = time.perf_counter() - start
    ran = len({r.problem for r in rows})
    # the problems' order, whichever run measured them; a reused row takes the problem's
    # split now (a finished fresh round has joined the selection half)
    rows = [
        dataclasses.replace(r, split=p.split)
        for p in problems
        for r in (*old, *rows)
        if r.problem == p.name
    ]
    from .peer_suite import config_table

    command = command_line("dpmsolver.bench.suite", argv)
    what = (
        "with no solver named (`dpmpp_2m`, and `unipc` on rectified flow below guidance 5: "
        "`dpmsolver.default_solver`)"
        if args.ours == DEFAULT_OURS
        else f"solver='{args.ours}'"
    )
    ran_line = (
        f"Command: `{command}`; took {seconds / 60:.1f} min on one CPU thread (shared "
        f"machine) for the {ran} problem(s) it ran"
        + (f"; the other {len(problems) - ran} are `--reuse`d as recorded" if old else "")
        + "."
    )
    history = kept_commands(args.out)
    if history is not None:
        print(
            f"{args.out}: kept its hand-kept 'Commands:' paragraph; add this run to it: {ran_line}",
            file=sys.stderr,
        )
    text = (
        f"# Baseline on the sampling suite: our {args.ours} against the best peer\n\n"
        f"RMS error against the exact sample; {batch} samples per problem (labels cycling "
        "through the classes, the problem's default noise), every applicable peer "
        "configuration of `dpmsolver.bench.peer_suite` per cell, each at exactly the cell's "
        f"NFE (configurations that cannot spend it are skipped); ours is `dpmsolver.sample` "
        f"{what} at `nfe=N` on its default grid (log-SNR; uniform in shifted time on "
        "rectified flow, a thousandth of the range in from pure noise).\n\n"
        + (history if history is not None else ran_line)
        + "\n\n"
        + baseline_markdown(rows, problems)
        + "\n## Peer configurations\n\n"
        + config_table()
    )
    publish(text, args.out)
    if args.csv:
        write_text(args.csv, baseline_csv(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
