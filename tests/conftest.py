"""Shared fixtures: the exact Gaussian-mixture problem and its reference solution."""

from __future__ import annotations

import pytest

import dpmsolver as dp
from dpmsolver.bench.convergence import ExactProblem, exact_problem


@pytest.fixture(scope="session")
def sd_problem() -> ExactProblem:
    """Stable Diffusion's discrete schedule, integrated from t=999 to t=50 (float64)."""
    return exact_problem(dp.DiscreteVPSchedule(), 50.0)
