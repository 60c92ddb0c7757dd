"""tune's stage (e): the chosen recipe with its step into sigma = 0 extrapolated from the
last two data predictions (``final_step="extrapolate"``, :class:`dpmsolver.loop.FinalStep`),
kept only where the held-out half takes it; the profile, ``sample`` and the diffusers
scheduler run it as tuned, and the k-diffusion sigmas warn that they cannot."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.tune import TuneOptions
from dpmsolver.tune.acceptance import _accept

from .test_step_limit import _scheduler_run
from .test_tune import CHEAP, COND, NET, SD, Z

pytest.importorskip("scipy")
ARGS = dict(schedule=SD, guidance_scale=3.0, nfe=[5, 8, 12], tail_rows=0, **COND, **CHEAP)


def test_stage_e_keeps_the_extrapolated_end_only_where_the_held_out_half_takes_it() -> None:
    off = dp.tune(NET, Z, extrapolate_final=False, **ARGS)
    on = dp.tune(NET, Z, **ARGS)
    kept = 0
    for a, b in zip(on.choices, off.choices, strict=True):
        assert b.recipe.final_step == "denoise"
        same = dataclasses.replace(
            a.with_recipe(final_step="denoise"), seconds=b.seconds, evaluations=b.evaluations
        )
        if a.recipe.final_step == "denoise":
            assert same == b  # refused: the choice of a tune without stage (e)
        else:
            kept += 1
            assert a.recipe.final_step == "extrapolate" and a.heldout_error < b.heldout_error
            same = dataclasses.replace(same, heldout_error=b.heldout_error)
            assert same.recipe == b.recipe  # the same recipe but for its end
    assert kept > 0  # the extrapolated end helps here at some budget


def test_a_kept_extrapolated_end_is_what_the_profile_samples_with(
    patch_tune: Callable[[str, Any], None],
) -> None:
    real = _accept

    def takes_it(new, old, prob, worst_factor, **kw):  # type: ignore[no-untyped-def]
        return new.recipe.final_step == "extrapolate" or real(new, old, prob, worst_factor, **kw)

    patch_tune("_accept", takes_it)
    forced = dp.tune(NET, Z, guard_rows=0, **ARGS)
    plain = dp.tune(NET, Z, guard_rows=0, extrapolate_final=False, **ARGS)
    for a, b in zip(forced.choices, plain.choices, strict=True):
        assert a.recipe.final_step == "extrapolate"
        kw = dict(schedule=SD, solver="auto", nfe=a.nfe, guidance_scale=3.0, **COND)
        x = dp.sample(NET, Z, profile=forced, **kw).x  # type: ignore[arg-type]
        y = dp.sample(NET, Z, profile=plain, **kw).x  # type: ignore[arg-type]
        want = dp.sample(
            NET,
            Z,
            schedule=SD,
            solver=dataclasses.replace(b.recipe, final_step="extrapolate"),
            guidance_scale=3.0,
            **COND,
            **({} if b.recipe.timesteps else {"nfe": b.nfe}),
        ).x
        assert torch.equal(x, want) and not torch.equal(x, y)
    assert dp.Profile.from_json(forced.to_json()) == forced


def test_the_k_diffusion_sigmas_warn_that_they_denoise() -> None:
    prof = dp.tune(NET, Z, schedule=SD, nfe=[8], shift_runs=0, tail_rows=0, **CHEAP)
    c = prof.choices[0].with_recipe(final_step="extrapolate", lower_order_final=None)
    ext = dataclasses.replace(prof, choices=(c,))
    with pytest.warns(UserWarning, match="final_step"):
        ext.sigmas(8, 1.0, SD)


@pytest.mark.parametrize(("solver", "options"), [("unipc", {"order": 2}), ("dpmpp_2s", {})])
def test_the_diffusers_scheduler_extrapolates_as_sample_does(solver: str, options: dict) -> None:
    pytest.importorskip("diffusers")
    prof = dp.tune(NET, Z, schedule=SD, nfe=[9], shift_runs=0, norm_cap=None, **CHEAP)
    c = prof.choices[0].with_recipe(
        solver=solver, options=options, grid="logsnr", rho=None, timesteps=None
    )
    plain, ext = (
        dataclasses.replace(prof, choices=(c.with_recipe(final_step=v),))
        for v in ("denoise", "extrapolate")
    )
    z = Z[:6]
    want_plain = dp.sample(NET, z, schedule=SD, solver="auto", nfe=9, profile=plain).x
    want_ext = dp.sample(NET, z, schedule=SD, solver="auto", nfe=9, profile=ext).x
    change = float((want_ext - want_plain).abs().max())
    assert change > 1e-3  # the extrapolated end moves the samples here
    got_plain, got_ext = (_scheduler_run(p, z, 9) for p in (plain, ext))
    # the config's float32 betas move both runs alike; what the end changes must match
    assert float((got_plain - want_plain).abs().max()) < 5e-3
    assert float(((got_ext - got_plain) - (want_ext - want_plain)).abs().max()) < 0.05 * change


def test_extrapolate_final_is_checked() -> None:
    with pytest.raises(ValueError, match="extrapolate_final"):
        TuneOptions(extrapolate_final="yes")  # type: ignore[arg-type]
