"""Shared fixtures: the exact Gaussian-mixture problem and its reference solution."""

from __future__ import annotations

import pytest
import torch

import dpmsolver as dp
from dpmsolver.digits import DigitsClassifier, load_classifier
from dpmsolver.digits.train import load_digits_split
from dpmsolver.orders import ExactProblem, exact_problem

# Every test works on tiny tensors, where intra-op threads only cost: on a busy machine a
# one-element log_sigmoid waits ~10 ms for its thread pool (measured: the NFE tests of
# two solver families take 9.1 s with 2 threads, 2.0 s with 1). pytest-xdist already
# runs one worker per core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd_problem() -> ExactProblem:
    """Stable Diffusion's discrete schedule, integrated from t=999 to t=50 (float64)."""
    return exact_problem(dp.DiscreteVPSchedule(), 50.0)


@pytest.fixture(scope="session")
def clf() -> DigitsClassifier:
    """The shipped digit classifier."""
    return load_classifier()


@pytest.fixture(scope="session")
def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits train/test split (x_train, y_train, x_test, y_test)."""
    return load_digits_split()
