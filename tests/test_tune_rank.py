"""Stage (a) of dpmsolver.tune ranks its finalists on the calibration half by default
(``rank_rows="calibration"``), on every pilot row (``"pilot"``) or on the worse of the two
halves (``"worse"``); either way the held-out half alone decides whether the winner beats
the default."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.recipe import Recipe
from dpmsolver.tune import TuneOptions
from dpmsolver.tune.pilot import _Choice, _Counter, _pilot, _Problem, _RowDenoiser
from dpmsolver.tune.search import _tune_budget

from .test_tune import NET, SD, Y, Z

pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def problem():  # type: ignore[no-untyped-def]
    den = _Counter(_RowDenoiser(NET, "eps", {"y": Y}, {"y": torch.full_like(Y, 3)}, 5.0, None))
    return _pilot(den, SD, Z, 1e-5, 4, 0, 0)  # no DP material: stage (b) does not run


def test_pooled_is_the_rms_over_every_pilot_row() -> None:
    cal = torch.tensor([0.1, 0.3, 0.2])
    held = torch.tensor([0.5, 0.4])
    c = _Choice(Recipe("ddim"), "selection", float(cal.pow(2).mean().sqrt()), held, 8)
    assert c.pooled(3) == pytest.approx(float(torch.cat([cal, held]).pow(2).mean().sqrt()))


# ddim wins on the calibration half, dpmpp_multistep on the whole pilot (RMS 0.226), unipc
# on the worse half (0.24 against dpmpp_multistep's 0.25 and ddim's 0.5); all beat the
# default (held-out errors 1) on every held-out sample
ERRORS = {"ddim": (0.1, 0.5), "dpmpp_multistep": (0.2, 0.25), "unipc": (0.24, 0.24)}


def test_worse_half_is_the_larger_rms_of_the_two_halves() -> None:
    held = torch.tensor([0.5, 0.4])
    c = _Choice(Recipe("ddim"), "selection", 0.3, held, 8)
    assert c.worse_half() == pytest.approx(float(held.pow(2).mean().sqrt()))
    assert _Choice(Recipe("ddim"), "selection", 0.7, held, 8).worse_half() == 0.7


@pytest.mark.parametrize(
    ("rank_rows", "chosen"),
    [("pilot", "dpmpp_multistep"), ("calibration", "ddim"), ("worse", "unipc")],
)
def test_the_finalists_are_ranked_on_the_chosen_rows(
    problem: _Problem, patch_tune: Callable[[str, Any], None], rank_rows: str, chosen: str
) -> None:
    def fake(prob: object, recipe: Recipe, nfe: int, stage: str) -> _Choice:
        cal, held = (1.0, 1.0) if stage == "default" else ERRORS[recipe.solver]
        return _Choice(recipe, stage, cal, torch.full((len(problem.held),), held), nfe)

    patch_tune("_choice", fake)
    opts = TuneOptions(
        solvers=(("ddim", {}), ("dpmpp_multistep", {"order": 2}), ("unipc", {"order": 2})),
        grids=(("time_uniform", None),),
        finalists=3,
        shift_runs=0,
        rank_rows=rank_rows,
    )
    c = _tune_budget(problem, 8, 5.0, opts)
    assert (c.recipe.solver, c.stage) == (chosen, "selection")


def test_rank_rows_and_fine_rows_are_checked() -> None:
    with pytest.raises(
        ValueError,
        match="rank_rows='held' is not supported; accepted values: 'calibration', 'pilot', 'worse'",
    ):
        dp.tune(NET, Z, schedule=SD, rank_rows="held")
    with pytest.raises(ValueError, match="fine_rows"):
        dp.tune(NET, Z, schedule=SD, fine_rows=0)
    # the defaults are the ranking and the rows stage (a) and the DP had before the options
    assert (TuneOptions().rank_rows, TuneOptions().screen_rows, TuneOptions().fine_rows) == (
        "calibration",
        8,
        8,
    )
