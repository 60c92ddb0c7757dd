"""Shared fixtures: the exact Gaussian-mixture problem and its reference solution."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

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


@pytest.fixture
def patch_tune(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Any], None]:
    """Replace one helper of :mod:`dpmsolver.tune` wherever the package binds it: its
    modules import their helpers by name, so each caller holds its own binding, and a test
    that swaps a helper means every caller's."""

    def patch(name: str, value: Any) -> None:
        import dpmsolver.tune  # noqa: F401  (loads every module of the package)

        mods = [
            m
            for n, m in sorted(sys.modules.items())
            if n.startswith("dpmsolver.tune.") and hasattr(m, name)
        ]
        assert mods, f"no module of dpmsolver.tune binds {name!r}"
        for m in mods:
            monkeypatch.setattr(m, name, value)

    return patch
