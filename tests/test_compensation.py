"""Stage (f), the compensation of the data prediction (:mod:`dpmsolver.compensation`): the
loop applies ``D_k + c_k (D_k - D_{k-1})`` at each step's start, ``tune`` keeps it only
where the held-out half improves, and the profile, ``sample`` and the diffusers scheduler
run it as tuned, while the k-diffusion sigmas warn that they cannot."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.compensation import Compensation, check_compensation
from dpmsolver.tune import TuneOptions
from dpmsolver.tune.stages import _spread as spread

from .test_step_limit import _scheduler_run
from .test_tune import CHEAP, COND, NET, SD, Z

pytest.importorskip("scipy")


def _ddim_by_hand(z: torch.Tensor, ratios: list[float], nfe: int) -> torch.Tensor:
    """DDIM (data form) on the log-SNR grid with the compensated predictions, written out."""
    knots = dp.make_grid(SD, nfe, "logsnr").knots
    x, prev = z * knots[0].sigma, None
    for k, (s, t) in enumerate(itertools.pairwise(knots)):
        d = NET(x, torch.tensor(s.model_t))  # eps network
        d0 = (x - s.sigma * d) / s.alpha  # its data prediction
        use = d0 if prev is None else d0 + ratios[k - 1] * (d0 - prev)
        prev = d0
        if t.sigma == 0:
            x = use
        else:
            x = t.sigma / s.sigma * x + t.alpha * (1 - t.sigma / s.sigma * s.alpha / t.alpha) * use
    return x


def test_the_loop_feeds_the_solver_the_compensated_prediction() -> None:
    z, nfe, ratios = Z[:4], 5, [0.3, -0.2, 0.1, 0.4]
    recipe = dp.Recipe("ddim", grid="logsnr", compensation=tuple(ratios))
    got = dp.sample(NET, z, schedule=SD, prediction="eps", solver=recipe, nfe=nfe).x
    want = _ddim_by_hand(z, ratios, nfe)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)  # the network's time in float32
    plain = dp.sample(NET, z, schedule=SD, prediction="eps", solver="ddim", grid="logsnr", nfe=nfe)
    assert float((got - plain.x).abs().max()) > 1e-3  # the ratios move the samples
    zeros = dataclasses.replace(recipe, compensation=(0.0,) * 4)
    same = dp.sample(NET, z, schedule=SD, prediction="eps", solver=zeros, nfe=nfe).x
    assert torch.equal(same, plain.x)  # no ratio, the plain solver bit for bit


def test_bad_ratios_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"compensation\[1\]"):
        dp.Recipe("ddim", compensation=(0.1, float("nan")))
    with pytest.raises(TypeError, match="compensation"):
        check_compensation("0.1")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"compensation: one ratio per step after the first, i\.e\. 4"
    ):
        dp.sample(
            NET,
            Z[:2],
            schedule=SD,
            prediction="eps",
            nfe=5,
            solver=dp.Recipe("ddim", compensation=(0.1, 0.2)),
        )
    assert Compensation([0.5], 2).ratios == (0.5,)
    for bad in (
        {"compensation_runs": -1},
        {"compensation_rows": 0},
        {"compensation_bound": 0.0},
        {"compensation_max_nfe": 0},
        {"compensation_knots": 1},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TuneOptions(**bad)  # type: ignore[arg-type]


ARGS = dict(schedule=SD, guidance_scale=3.0, nfe=[5, 8], tail_rows=0, **COND)
# DDIM alone: the compensation turns it into a multistep method, which helps at 5 NFE (and
# without stage (i), which acts where the default UniPC recipe stays, before (f) and (g))
DDIM = dict(
    CHEAP, solvers=(("ddim", {}),), grids=(("logsnr", None),), shift_runs=0, corrector_search=False
)


def kept_where_held_out_takes_it(on: dp.Profile, off: dp.Profile, stage: str) -> list[Any]:
    """Checks a late stage (its name is also the recipe's field) against a tune without it:
    a refused budget is that tune's choice; a kept one has its stage, a lower held-out error
    and otherwise the same recipe. The kept choices (at least one)."""
    kept = []
    for a, b in zip(on.choices, off.choices, strict=True):
        assert getattr(b.recipe, stage) is None and b.stage != stage
        if getattr(a.recipe, stage) is None:
            same = dataclasses.replace(a, seconds=b.seconds, evaluations=b.evaluations)
            assert same == b  # refused: the choice of a tune without the stage
        else:
            kept.append(a)
            assert a.stage == stage and a.heldout_error < b.heldout_error
            assert dataclasses.replace(a.recipe, **{stage: None}) == b.recipe
    assert kept
    assert dp.Profile.from_json(on.to_json()) == on
    return kept


def test_stage_f_is_kept_only_where_the_held_out_half_takes_it() -> None:
    on = dp.tune(NET, Z, **ARGS, **{**DDIM, "compensation_runs": 40})
    off = dp.tune(NET, Z, **ARGS, **{**DDIM, "compensation_runs": 0})
    for a in kept_where_held_out_takes_it(on, off, "compensation"):
        assert len(a.recipe.compensation) == a.nfe - 1
        assert all(abs(c) <= 0.5 for c in a.recipe.compensation)  # compensation_bound
    # only up to compensation_max_nfe
    low = dp.tune(NET, Z, **ARGS, **{**DDIM, "compensation_runs": 40, "compensation_max_nfe": 6})
    assert low.choice(8, 3.0).recipe.compensation is None  # type: ignore[union-attr]


def test_above_compensation_knots_the_ratios_are_linear_between_fitted_values() -> None:
    assert spread([0.1, 0.2, 0.3], 3) == (0.1, 0.2, 0.3)  # as many values as steps: as is
    assert spread([0.0, 0.4, -0.2], 5) == pytest.approx((0.0, 0.2, 0.4, 0.1, -0.2))
    # at guidance 7.5 the untuned default at 8 NFE is DDIM too, so the compensated DDIM is
    # what the held-out half keeps (at 3 the default UniPC row wins there since stop 58)
    args = {**ARGS, "nfe": [8], "guidance_scale": 7.5}
    prof = dp.tune(NET, Z, **args, **{**DDIM, "compensation_runs": 40, "compensation_knots": 3})
    c = prof.choices[0].recipe.compensation
    assert c is not None and len(c) == 7  # 7 ratios from 3 values, at steps 0, 3 and 6
    for seg in (c[:4], c[3:]):
        assert [b - a for a, b in itertools.pairwise(seg)] == pytest.approx(
            [seg[1] - seg[0]] * 3, abs=1e-12
        )
    assert len(set(c)) > 1


def late_stage_profile(**late: Any) -> dp.Profile:
    """A one-budget profile (9 NFE, guidance 1) whose choice is UniPC-2 on the log-SNR grid
    with ``late`` (a late stage's field, e.g. ``compensation=...``) and nothing else fitted."""
    prof = dp.tune(NET, Z, schedule=SD, nfe=[9], shift_runs=0, norm_cap=None, **CHEAP)
    c = prof.choices[0].with_recipe(
        solver="unipc",
        grid="logsnr",
        rho=None,
        timesteps=None,
        final_step="denoise",
        step_limit=None,
        **{"options": {"order": 2}, "compensation": None, **late},
    )
    return dataclasses.replace(prof, choices=(c,))


def _compensated(ratios: tuple[float, ...] | None) -> dp.Profile:
    return late_stage_profile(compensation=ratios)


def sample_and_scheduler_agree(plain: dp.Profile, late: dp.Profile) -> None:
    """``sample`` runs ``late``'s choice as its recipe says, and the diffusers scheduler
    changes the samples as ``sample`` does (against ``plain``, the choice without it)."""
    z = Z[:6]
    want_plain = dp.sample(NET, z, schedule=SD, solver="auto", nfe=9, profile=plain).x
    want = dp.sample(NET, z, schedule=SD, solver="auto", nfe=9, profile=late).x
    by_recipe = dp.sample(NET, z, schedule=SD, solver=late.choices[0].recipe, nfe=9).x
    assert torch.equal(want, by_recipe)
    change = float((want - want_plain).abs().max())
    assert change > 1e-3
    pytest.importorskip("diffusers")
    got_plain, got = (_scheduler_run(p, z, 9) for p in (plain, late))
    # the config's float32 betas move both runs alike, and a late stage amplifies that;
    # what it changes must still match (compensation ratios one step off: 2.3x the change;
    # ratios 0.9x as large: 0.2x)
    assert float((got_plain - want_plain).abs().max()) < 5e-3
    assert float(((got - got_plain) - (want - want_plain)).abs().max()) < 0.1 * change


def test_the_profile_samples_with_it_and_the_diffusers_scheduler_as_sample_does() -> None:
    ratios = (0.2, -0.1, 0.3, 0.1, -0.2, 0.25, 0.1, 0.05)
    sample_and_scheduler_agree(_compensated(None), _compensated(ratios))


def test_the_k_diffusion_sigmas_warn_that_they_drop_it() -> None:
    comp = _compensated((0.1,) * 8)
    with pytest.warns(UserWarning, match="compensation"):
        comp.sigmas(9, 1.0, SD)


def test_an_older_profile_reads_without_compensation() -> None:
    data = _compensated(None).to_json()
    data["format"] = "dpmsolver-profile/6"
    for c in data["choices"]:
        del c["compensation"]
    old = dp.Profile.from_json(data)
    assert old.choices[0].recipe.compensation is None
