"""The resampling check of the default's leave-one-out score (dpmsolver.bench.policy_noise):
a rerun cell reproduces the recorded ratio, and the bootstrap range brackets it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpmsolver.bench.policy import Study, rows_from_text
from dpmsolver.bench.policy_noise import bootstrap_cell
from dpmsolver.bench.suite import _read_text, rows_from_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study() -> Study:
    rows, _ = rows_from_text(_read_text(str(ROOT / "benchmarks" / "policy.csv.gz")))
    peers = rows_from_csv(_read_text(str(ROOT / "benchmarks" / "suite_baseline.csv.gz")))
    return Study(rows, peers)


def test_a_rerun_cell_reproduces_its_recorded_ratio_and_the_bootstrap_brackets_it(
    study: Study,
) -> None:
    cell, recipe = ("iso2-vplin", 3.0, 5), "ddim logsnr"
    ratio, lo, med, hi, share = bootstrap_cell(cell, recipe, resamples=400)
    assert ratio == pytest.approx(study.ratios[cell][recipe], rel=2e-3)
    assert lo <= med <= hi and lo < ratio < hi
    assert 1 / 64 <= share <= 1.0


def test_a_recipe_that_cannot_spend_the_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot spend"):
        bootstrap_cell(("iso8-flow", 3.0, 6), "dpmpp_fast logsnr", resamples=10)
