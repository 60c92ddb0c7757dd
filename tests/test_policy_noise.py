"""The resampling check of the default's leave-one-out score (dpmsolver.bench.policy_noise):
a rerun cell reproduces the recorded ratio, and the bootstrap range brackets it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpmsolver.bench.policy import Study, rows_from_text
from dpmsolver.bench.policy_noise import bootstrap_cell
from dpmsolver.bench.records import read_text
from dpmsolver.bench.suite import rows_from_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study() -> Study:
    rows, _ = rows_from_text(read_text(str(ROOT / "benchmarks" / "policy.csv.gz")))
    peers = rows_from_csv(read_text(str(ROOT / "benchmarks" / "suite_baseline.csv.gz")))
    return Study(rows, peers)


def test_a_rerun_cell_reproduces_its_recorded_ratio_and_the_bootstrap_brackets_it(
    study: Study,
) -> None:
    cell, recipe = ("iso2-vplin", 3.0, 5), "ddim logsnr"
    ratio, lo, med, hi, share = bootstrap_cell(cell, recipe, resamples=400)
    assert ratio == pytest.approx(study.ratios[cell][recipe], rel=2e-3)
    assert lo <= med <= hi and lo < ratio < hi
    assert 1 / 64 <= share <= 1.0


def test_an_unknown_recipe_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="recipe: 'ddim nowhere' is not a candidate"):
        bootstrap_cell(("iso2-vplin", 3.0, 5), "ddim nowhere", resamples=10)


def test_the_readme_quotes_the_recorded_resampling() -> None:
    record = (ROOT / "benchmarks" / "policy_noise.md").read_text()
    first = next(line for line in record.splitlines() if line.startswith("| one table"))
    cells = [c.strip() for c in first.strip("|").split("|")]
    ratio, lo, hi = cells[3], cells[5], cells[7]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"score ({ratio})" in readme and f"from {lo} to {hi} (5-95%" in readme
