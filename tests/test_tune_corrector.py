"""Stage (i), the corrector of each step (USF's per-step strategy for UniPC's corrector):
the greedy pass finds the steps its objective leaves uncorrected and tries no other,
``tune`` keeps them only where the held-out half takes them, and the profile, ``sample``
and the diffusers scheduler run them as tuned while the k-diffusion sigmas warn that they
cannot. (The solver option itself is checked against diffusers' ``disable_corrector`` in
tests/test_peers.py.)"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import dpmsolver as dp
from dpmsolver.recipe import Recipe
from dpmsolver.tune import TuneOptions

from .test_compensation import ARGS, late_stage_profile, sample_and_scheduler_agree
from .test_tune import CHEAP, NET, SD, Z
from .test_tune_orders import greedy_pass

pytest.importorskip("scipy")


def _greedy(monkeypatch: pytest.MonkeyPatch, base: Recipe, nfe: int, cost: Any) -> Any:
    """``_uncorrect`` on ``base`` with ``cost(skip)`` as the error on the rows."""

    def skip(recipe: Recipe, n: int) -> tuple[int, ...]:
        return tuple(recipe.build_solver().corrector_skip)  # type: ignore[attr-defined]

    return greedy_pass(monkeypatch, "_uncorrect", base, nfe, skip, cost)


def test_the_greedy_pass_finds_the_steps_to_leave_uncorrected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = Recipe("unipc", {"order": 2}, grid="logsnr")
    # 8 steps, the last into sigma = 0 (the loop's own step, which corrects nothing): the
    # results of steps 0-5 are corrected by the step after them
    assert base.plan(SD, nfe=8).steps[-1].boundary
    target = {0, 1, 4}

    def cost(skip: Sequence[int]) -> float:
        return len(target.symmetric_difference(skip))

    found, runs = _greedy(monkeypatch, base, 8, cost)
    recipe, stage = found
    assert stage == "corrector" and recipe.options == {"order": 2, "corrector_skip": (0, 1, 4)}
    assert len(runs) == 1 + 6 and runs[0] == ()  # the start, then each step once
    assert all(max(r, default=0) <= 5 for r in runs)
    # nothing better than correcting every step: no choice
    assert _greedy(monkeypatch, base, 8, lambda skip: 1.0)[0] is None
    # no corrector to skip: other solvers, UniPC without it or with a list already
    for other in (
        Recipe("dpmpp_multistep", {"order": 2}),
        Recipe("unipc", {"order": 2, "use_corrector": False}),
        Recipe("unipc", {"order": 2, "corrector_skip": (1,)}),
    ):
        assert _greedy(monkeypatch, other, 8, cost)[0] is None, other
    assert _greedy(monkeypatch, Recipe("dpmpp_singlestep", {"order": 2}), 9, cost)[0] is None


def test_stage_i_is_kept_only_where_the_held_out_half_takes_it() -> None:
    base = dict(
        CHEAP,
        solvers=(("unipc", {"order": 2}),),
        grids=(("logsnr", None),),
        shift_runs=0,
        compensation_runs=0,
        correction_components=0,
        guard_rows=0,  # the held-out half alone decides (the guard has tests of its own)
        corrector_search=False,
    )
    args = {**ARGS, "guidance_scale": 7.5, "nfe": [5, 6, 8, 10]}
    on = dp.tune(NET, Z, **args, **{**base, "corrector_search": True})
    off = dp.tune(NET, Z, **args, **base)
    kept = []
    for a, b in zip(on.choices, off.choices, strict=True):
        assert "corrector_skip" not in b.recipe.options and b.stage != "corrector"
        if "corrector_skip" not in a.recipe.options:
            same = dataclasses.replace(a, seconds=b.seconds, evaluations=b.evaluations)
            assert same == b  # refused: the choice of a tune without the stage
        else:
            kept.append(a)
            assert a.stage == "corrector" and a.heldout_error < b.heldout_error
            assert a.recipe.options["corrector_skip"]
            plain = {k: v for k, v in a.recipe.options.items() if k != "corrector_skip"}
            assert a.with_recipe(options=plain).recipe == b.recipe
    assert kept
    assert dp.Profile.from_json(on.to_json()) == on
    # only up to corrector_max_nfe
    low = dp.tune(NET, Z, **args, **{**base, "corrector_search": True, "corrector_max_nfe": 4})
    assert all("corrector_skip" not in c.recipe.options for c in low.choices)


def _skipping(skip: tuple[int, ...] | None) -> dp.Profile:
    options = {"order": 2} if skip is None else {"order": 2, "corrector_skip": skip}
    return late_stage_profile(options=options)


def test_the_profile_samples_with_it_and_the_diffusers_scheduler_as_sample_does() -> None:
    sample_and_scheduler_agree(_skipping(None), _skipping((0, 1, 2, 5)))


def test_saved_and_older_profiles_read_and_the_sigmas_warn(tmp_path: Path) -> None:
    prof = _skipping((0, 2))
    prof.save(tmp_path / "p.json")
    loaded = dp.Profile.load(tmp_path / "p.json")
    assert loaded == prof and loaded.choices[0].recipe.options["corrector_skip"] == (0, 2)
    with pytest.warns(UserWarning, match="corrector_skip"):
        prof.sigmas(9, 1.0, SD)
    # profile format 14 (12 added corrector_skip); an older file (no corrector_skip) still reads
    assert prof.to_json()["format"] == "dpmsolver-profile/14"
    older = _skipping(None).to_json()
    older["format"] = "dpmsolver-profile/11"
    assert "corrector_skip" not in dp.Profile.from_json(older).choices[0].recipe.options


def test_bad_settings_are_refused_by_name() -> None:
    for opt in ({"corrector_search": "yes"}, {"corrector_rows": 0}, {"corrector_max_nfe": 0}):
        with pytest.raises(ValueError, match=next(iter(opt))):
            TuneOptions(**opt)  # type: ignore[arg-type]
