"""The tail check of dpmsolver.tune: the final choice and stage (a)'s run from the guard's
noises; where they end far apart, the farthest guard rows get an exact reference, and the
choice with the smaller mean squared error over the held-out and guard rows is taken."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.analytic import exact_sample
from dpmsolver.recipe import Recipe
from dpmsolver.tune import TuneOptions
from dpmsolver.tune.acceptance import _tail_checked
from dpmsolver.tune.pilot import _Choice, _Counter, _Guard, _pilot, _Problem, _RowDenoiser, _Rows

from .test_tune import COND, FAST, NET, SD, Y, Z

pytest.importorskip("scipy")

ROWS = 24
CHOSEN, ROBUST = Recipe("unipc", {"order": 3}), Recipe("ddim")


@pytest.fixture(scope="module")
def problem() -> _Problem:
    den = _Counter(_RowDenoiser(NET, "eps", {"y": Y}, {"y": torch.full_like(Y, 3)}, 5.0, None))
    return _pilot(den, SD, Z, 1e-5, 4, 0, 0, guard=(ROWS, 2.0))


def _choice(recipe: Recipe, held: float, n: int) -> _Choice:
    return _Choice(recipe, "selection", held, torch.full((n,), held, dtype=torch.float64), 8)


def _guard(problem: _Problem, far: dict[int, float], truth: str) -> _Guard:
    """The problem's guard with both recipes' runs in place: they agree to 1e-3 except on
    the rows ``far`` (row -> distance), where ``truth`` names the one the reference sides
    with."""
    g = dataclasses.replace(problem.guard, runs={}, references={})  # type: ignore[arg-type]
    base = torch.zeros(ROWS, *Z.shape[1:], dtype=torch.float64)
    chosen, robust = base.clone(), base + 1e-3
    for i, d in far.items():
        chosen[i] += d
    runs = {repr(CHOSEN): chosen, repr(ROBUST): robust}
    g.samples = lambda prob, recipe, nfe, accept=False: runs[repr(recipe)]  # type: ignore[method-assign]
    for i in far:
        g.references[i] = (chosen if truth == "chosen" else robust)[i].clone()
    return g


def test_a_far_guard_sample_sends_the_choice_back_to_stage_a(problem: _Problem) -> None:
    n = len(problem.held)
    chosen, robust = _choice(CHOSEN, 0.01, n), _choice(ROBUST, 0.02, n)
    opts = TuneOptions(tail_rows=8)
    # one guard row where the fitted choice ends 5 away and the reference agrees with (a)
    g = _guard(problem, {3: 5.0}, truth="robust")
    assert _tail_checked(problem, g, chosen, robust, opts) is robust
    # the same row, but the reference agrees with the fitted choice: it stays
    g = _guard(problem, {3: 5.0}, truth="chosen")
    assert _tail_checked(problem, g, chosen, robust, opts) is chosen
    # a small far error does not outweigh the fitted choice's lower typical error
    g = _guard(problem, {3: 0.08}, truth="robust")
    assert _tail_checked(problem, g, chosen, robust, opts) is chosen


def test_no_reference_is_solved_where_the_two_agree(problem: _Problem) -> None:
    n = len(problem.held)
    g = _guard(problem, {}, truth="robust")
    chosen, robust = _choice(CHOSEN, 0.01, n), _choice(ROBUST, 0.02, n)
    assert _tail_checked(problem, g, chosen, robust, TuneOptions(tail_rows=8)) is chosen
    assert g.references == {}
    # rows apart by less than tail_factor times the largest held-out sum are not checked
    g = _guard(problem, {5: 0.05}, truth="robust")
    g.references.clear()
    opts = TuneOptions(tail_rows=8, tail_factor=2.0)
    assert _tail_checked(problem, g, chosen, robust, opts) is chosen
    assert g.references == {}


def test_only_the_farthest_tail_rows_get_a_reference(problem: _Problem) -> None:
    n = len(problem.held)
    g = _guard(problem, {1: 3.0, 2: 4.0, 7: 5.0}, truth="robust")
    g.references.clear()

    def solve(prob: object, rows: list[int]) -> torch.Tensor:
        for i in rows:
            g.references[i] = g.samples(problem, ROBUST, 8)[i].clone()  # type: ignore[index]
        return torch.stack([g.references[i] for i in rows])

    g.reference = solve  # type: ignore[method-assign,assignment]
    chosen, robust = _choice(CHOSEN, 0.01, n), _choice(ROBUST, 0.02, n)
    assert _tail_checked(problem, g, chosen, robust, TuneOptions(tail_rows=2)) is robust
    assert sorted(g.references) == [2, 7]


def test_the_guard_reference_is_the_exact_sample_of_its_rows(problem: _Problem) -> None:
    g = dataclasses.replace(problem.guard, runs={}, references={})  # type: ignore[arg-type]
    ref = g.reference(problem, [4, 1])
    rows = [g.rows[4], g.rows[1]]
    want = exact_sample(_Rows(problem.denoiser, rows), g.x_T[[4, 1]], SD, rtol=problem.rtol)
    torch.testing.assert_close(ref, want)
    assert sorted(g.references) == [1, 4]  # kept for the other budgets
    torch.testing.assert_close(g.reference(problem, [1]), want[1:])


def test_tune_takes_stage_a_where_the_tail_check_says_so(
    patch_tune: Callable[[str, Any], None],
) -> None:

    def back(prob: object, guard: object, chosen: _Choice, robust: _Choice, opts: object):  # type: ignore[no-untyped-def]
        return robust

    fast = {**FAST, "shift_runs": 8}
    off = dp.tune(NET, Z, schedule=SD, guidance_scale=5.0, nfe=[6, 10], tail_rows=0, **COND, **fast)
    assert any(c.stage in ("steps", "shifts") for c in off.choices)  # something to refuse
    on = dp.tune(NET, Z, schedule=SD, guidance_scale=5.0, nfe=[6, 10], tail_rows=8, **COND, **fast)
    for a, b in zip(off.choices, on.choices, strict=True):
        # the check only ever goes back to stage (a), and says so
        assert b.recipe == a.recipe or (
            b.stage in ("selection", "default") and set(b.guard_refused) & {"steps", "shifts"}
        )
    patch_tune("_tail_checked", back)
    p = dp.tune(NET, Z, schedule=SD, guidance_scale=5.0, nfe=[6, 10], tail_rows=8, **COND, **fast)
    for c in p.choices:
        assert c.stage in ("selection", "default") and c.recipe.timesteps is None
    assert any(set(c.guard_refused) & {"steps", "shifts"} for c in p.choices)


def test_the_walk_back_keeps_the_latest_stage_the_tail_check_keeps(
    patch_tune: Callable[[str, Any], None],
) -> None:
    """With ``tail_walk_back`` (the default) a refused final choice falls back to the stage
    accepted before it, where the check keeps that one, instead of to stage (a)'s; without
    it, to stage (a)'s. Here the check refuses stage (c)'s time shifts only."""

    def no_shifts(prob: object, guard: object, chosen: _Choice, robust: _Choice, opts: object):  # type: ignore[no-untyped-def]
        return robust if chosen.stage == "shifts" else chosen

    patch_tune("_tail_checked", no_shifts)
    fast = {**FAST, "shift_runs": 8}
    args = {"schedule": SD, "guidance_scale": 5.0, "nfe": [5, 6, 8, 10], **COND, **fast}
    plain = dp.tune(NET, Z, tail_walk_back=False, **args)  # type: ignore[arg-type]
    walked = dp.tune(NET, Z, **args)  # type: ignore[arg-type]
    kept = 0
    for a, b in zip(plain.choices, walked.choices, strict=True):
        assert "shifts" not in (a.stage, b.stage)
        if "shifts" in a.guard_refused and b.stage == "steps":
            # stage (b)'s knots, which the plain check dropped for stage (a)'s recipe
            assert a.stage in ("selection", "default") and a.recipe.timesteps is None
            assert b.recipe.timesteps is not None and b.guard_refused == ("shifts",)
            kept += 1
        else:
            assert b.recipe == a.recipe
    assert kept > 0


def test_tail_options_are_checked() -> None:
    with pytest.raises(ValueError, match="tail_rows"):
        dp.tune(NET, Z, schedule=SD, tail_rows=-1)
    with pytest.raises(ValueError, match="tail_factor"):
        dp.tune(NET, Z, schedule=SD, tail_factor=0.0)
    with pytest.raises(ValueError, match="tail_walk_back"):
        dp.tune(NET, Z, schedule=SD, tail_walk_back="yes")
