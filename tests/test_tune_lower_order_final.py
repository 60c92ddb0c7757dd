"""Stage (a)'s third-order candidates with their last orders lowered at any step count (as
diffusers' UniPC does): they exist only where the default rule does not already lower
them, the profile stores the flag, reads older files without it, and says where a front
end cannot run it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.plan import LOWER_ORDER_FINAL_BELOW
from dpmsolver.recipe import Recipe
from dpmsolver.tune import PROFILE_FORMAT, BudgetChoice, Profile, schedule_fingerprint
from dpmsolver.tune.options import TUNE_SOLVERS
from dpmsolver.tune.selection import _candidate

from .test_tune import COND, NET, SD, Z

pytest.importorskip("scipy")


def test_candidates_lower_the_last_orders_only_where_the_default_does_not() -> None:
    lowered = [(n, o) for n, o in TUNE_SOLVERS if o.get("lower_order_final")]
    assert {n for n, _ in lowered} == {"unipc", "dpmpp_multistep", "deis"}
    for name, options in lowered:
        assert _candidate(name, options, "logsnr", None, LOWER_ORDER_FINAL_BELOW - 1) is None
        r = _candidate(name, options, "logsnr", None, 20)
        assert r is not None and r.lower_order_final is True
        assert "lower_order_final" not in r.options  # a recipe field, not a solver option
        plain = dataclasses.replace(r, lower_order_final=None)
        lo, full = r.plan(SD, nfe=20).orders, plain.plan(SD, nfe=20).orders
        assert len(lo) == len(full)
        # the step before the final (first-order) one is second order; the default keeps 3
        assert lo[-3:] == [3, 2, 1] and full[-3:] == [3, 3, 1]
    # the other candidates are unchanged
    r = _candidate("unipc", {"order": 3}, "karras", 7.0, 20)
    assert r == Recipe("unipc", {"order": 3}, grid="karras", rho=7.0)


def test_the_flag_round_trips_and_version_2_files_read(tmp_path: Path) -> None:
    p = _lowered_profile()
    path = tmp_path / "p.json"
    p.save(path)
    assert Profile.load(path) == p and json.loads(path.read_text())["format"] == PROFILE_FORMAT
    assert Profile.load(path).choices[0].recipe.lower_order_final is True
    # a version-2 file has no flag: the default rule
    data = json.loads(path.read_text())
    data["format"] = "dpmsolver-profile/2"
    for ch in data["choices"]:
        del ch["lower_order_final"]
    old = tmp_path / "v2.json"
    old.write_text(json.dumps(data))
    assert all(ch.recipe.lower_order_final is None for ch in Profile.load(old).choices)


def test_tune_keeps_the_flag_of_a_lowered_choice() -> None:
    p = dp.tune(
        NET,
        Z,
        schedule=SD,
        guidance_scale=5.0,
        nfe=[15, 20],
        fine_knots=16,
        refine_runs=4,
        shift_runs=0,
        finalists=1,
        solvers=(("unipc", {"order": 3, "lower_order_final": True}),),
        grids=(("logsnr", None), ("time_uniform", None)),
        **COND,
    )
    # a choice built on the candidate (UniPC-3) keeps its flag; one built on the untuned
    # default's recipe (UniPC-2 here, whatever later stage refined it) has none to keep
    assert any(c.recipe.options.get("order") == 3 for c in p.choices)
    for c in p.choices:
        assert c.recipe.lower_order_final is (True if c.recipe.options.get("order") == 3 else None)


def one_choice_profile(schedule: dp.NoiseSchedule, prediction: str, **fields: Any) -> Profile:
    """A profile holding one hand-made :class:`BudgetChoice` (``fields`` override its
    defaults, the choice's own or its recipe's: UniPC order 2 on the log-SNR grid, 8
    evaluations, guidance 1)."""
    own = {
        "nfe": 8,
        "guidance_scale": 1.0,
        "stage": "selection",
        "calibration_error": 0.1,
        "heldout_error": 0.1,
        "default_heldout_error": 0.2,
    }
    recipe = {"solver": "unipc", "options": {"order": 2}, "grid": "logsnr"}
    for k, v in fields.items():
        (own if k in own else recipe)[k] = v
    choice = BudgetChoice(**own, recipe=Recipe(**recipe))  # type: ignore[arg-type]
    return Profile(
        schedule=schedule_fingerprint(schedule),
        prediction=prediction,  # type: ignore[arg-type]
        choices=(choice,),
        pilot=8,
        reference_rtol=1e-3,
        reference_error=1e-5,
        evaluations=1,
        seconds=1.0,
    )


def _lowered_profile() -> Profile:
    return one_choice_profile(
        SD, "eps", nfe=20, guidance_scale=5.0, options={"order": 3}, lower_order_final=True
    )


def test_sample_runs_the_lowered_choice_and_sigmas_say_they_cannot() -> None:
    prof = _lowered_profile()
    kw = dict(cond=COND["cond"], uncond=COND["uncond"], guidance_scale=5.0)
    got = dp.sample(NET, Z, schedule=SD, solver="auto", nfe=20, profile=prof, **kw)
    want = dp.sample(NET, Z, schedule=SD, solver=prof.choices[0].recipe, nfe=20, **kw)
    plain = dp.sample(NET, Z, schedule=SD, solver=Recipe("unipc", {"order": 3}), nfe=20, **kw)
    assert torch.equal(got.x, want.x) and not torch.equal(got.x, plain.x)
    with pytest.warns(UserWarning, match="lower_order_final.*k-diffusion functions"):
        prof.sigmas(20, 5.0, SD)


def test_the_diffusers_scheduler_runs_the_lowered_orders() -> None:
    pytest.importorskip("diffusers")
    from dpmsolver.frontends.diffusers_scheduler import DPMSolverScheduler

    prof = _lowered_profile()
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sched = DPMSolverScheduler(solver="auto", guidance_scale=5.0, profile=prof, **sd)
    sched.set_timesteps(20)
    assert sched._orders == prof.choices[0].recipe.plan(SD, nfe=20).orders
    assert sched._orders[-3:] == [3, 2, 1]
