"""The per-sample step limit (dpmsolver.steplimit.StepLimit): what it changes, where the
sampling loop and the diffusers scheduler apply it, and tune's stage (d) that decides it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.schedules import Knot
from dpmsolver.solvers import Form, StepContext, first_order_step, get_solver
from dpmsolver.steplimit import StepLimit, StepRatios, check_step_limit
from dpmsolver.tune import TuneOptions
from dpmsolver.tune.acceptance import _accept

SD = dp.DiscreteVPSchedule()
FLOW = dp.RectifiedFlowSchedule()


def _ddim_step(schedule: dp.NoiseSchedule, x: torch.Tensor, x0: torch.Tensor, s: Knot, t: Knot):
    ddim = get_solver("ddim")

    def never(x: torch.Tensor, knot: Knot) -> torch.Tensor:  # pragma: no cover - not called
        raise AssertionError("a first-order step makes no evaluation")

    ctx = StepContext(0, s, t, 1, never, schedule)
    return ddim.step(ctx, x, x0, ddim.init_state())[0]


@pytest.mark.parametrize(("schedule", "s_t", "t_t"), [(SD, 0.6, 0.4), (FLOW, 1.0, 0.8)])
def test_the_limit_measures_from_ddims_step(
    schedule: dp.NoiseSchedule, s_t: float, t_t: float
) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    s, t = schedule.knot(s_t), schedule.knot(t_t)  # FLOW at t=1 is pure noise: alpha_s = 0
    ddim = _ddim_step(schedule, x, x0, s, t)
    limit = StepLimit(1.0)
    assert torch.equal(limit.apply(x, x0, ddim, s, t, 0), ddim)  # DDIM's step: no correction
    # a correction of 3 first-order displacements ends exactly 1 away from DDIM's step
    d = (ddim - x).norm(dim=1, keepdim=True)
    direction = torch.randn(3, 5, generator=g, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    out = limit.apply(x, x0, ddim + 3 * d * direction, s, t, 0)
    assert ((out - ddim).norm(dim=1) / d.flatten()).tolist() == pytest.approx([1.0] * 3)


def _corrected(
    ratios: list[float], seed: int
) -> tuple[Knot, Knot, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step from 0.6 to 0.5 on SD's schedule whose samples' corrections are ``ratios``
    times their first-order displacements, in random directions: ``s, t, x, x0``, DDIM's
    step ``x1``, the displacements' norms ``d`` (a column) and the corrected ``x_next``."""
    s, t = SD.knot(0.6), SD.knot(0.5)
    g = torch.Generator().manual_seed(seed)
    n = len(ratios)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, 6, generator=g, dtype=torch.float64)
    x1 = first_order_step(Form.DATA, x, x0, x0, s, t)
    d = (x1 - x).norm(dim=1, keepdim=True)
    direction = torch.randn(n, 6, generator=g, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    x_next = x1 + direction * d * torch.tensor(ratios, dtype=torch.float64).view(-1, 1)
    return s, t, x, x0, x1, d, x_next


def test_only_samples_over_the_limit_change_and_they_end_on_it() -> None:
    # corrections of 0.5, 1.9, 4 and 40 times the first-order displacement
    s, t, x, x0, x1, d, x_next = _corrected([0.5, 1.9, 4.0, 40.0], seed=1)
    out = StepLimit(2.0).apply(x, x0, x_next, s, t, 0)
    assert torch.equal(out[:2], x_next[:2])  # within the limit: bit for bit
    ratio = (out - x1).norm(dim=1) / d.flatten()
    assert ratio[2:].tolist() == pytest.approx([2.0, 2.0])
    cos = torch.nn.functional.cosine_similarity(out[2:] - x1[2:], x_next[2:] - x1[2:])
    assert cos.tolist() == pytest.approx([1.0, 1.0])  # shortened, not turned
    # non-finite rows pass for the loop to report; the step into sigma = 0 is left alone
    bad = x_next.clone()
    bad[3, 0] = math.nan
    assert math.isnan(float(StepLimit(2.0).apply(x, x0, bad, s, t, 0)[3, 0]))
    zero = SD.zero_knot()
    assert torch.equal(StepLimit(1.0).apply(x, x0, x_next, s, zero, 0), x_next)


def test_the_probe_records_the_largest_ratio_and_changes_nothing() -> None:
    s, t, x, x0, _, _, x_next = _corrected([0.3, 2.5, 1.0], seed=2)
    probe = StepRatios()
    assert torch.equal(probe.apply(x, x0, x_next, s, t, 0), x_next)
    assert probe.largest == pytest.approx(2.5)
    # a limit at that ratio leaves every sample as it is; a smaller one moves the largest
    assert torch.equal(StepLimit(2.5 + 1e-9).apply(x, x0, x_next, s, t, 0), x_next)
    assert not torch.equal(StepLimit(2.4).apply(x, x0, x_next, s, t, 0), x_next)
    # the step into sigma = 0 is not a limited step, so the probe does not read it
    probe.apply(x, x0, x0 + 100.0, s, SD.zero_knot(), 0)
    assert probe.largest == pytest.approx(2.5)


@pytest.mark.parametrize("bad", [0.5, -1.0, math.inf, math.nan])
def test_bad_limits_are_named(bad: float) -> None:
    with pytest.raises(ValueError, match="step_limit must be a finite number >= 1 or None"):
        dp.Recipe("unipc", step_limit=bad)
    with pytest.raises(ValueError, match="step_limit must be a finite number >= 1 or None"):
        TuneOptions(step_limit=bad)
    with pytest.raises(ValueError, match="kappa must be"):
        StepLimit(bad)
    with pytest.raises(TypeError, match="step_limit must be a number"):
        check_step_limit("2")  # type: ignore[arg-type]


def _guided() -> tuple[dp.MixtureNetwork, torch.Tensor, dict[str, object]]:
    mix = dp.default_mixture(dim=4, num_classes=2, components_per_class=2, seed=1)
    net = dp.MixtureNetwork(mix, SD, "eps")
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(16) % 2
    kw = dict(cond={"y": y}, uncond={"y": torch.full_like(y, 2)}, guidance_scale=7.5)
    return net, z, kw


def test_sample_applies_a_recipes_limit_and_a_loose_one_changes_nothing() -> None:
    net, z, kw = _guided()
    base = dp.Recipe("unipc", {"order": 3}, grid="logsnr")
    free = dp.sample(net, z, schedule=SD, solver=base, nfe=10, **kw).x
    loose = dataclasses.replace(base, step_limit=1e9)
    assert torch.equal(dp.sample(net, z, schedule=SD, solver=loose, nfe=10, **kw).x, free)
    tight = dp.sample(
        net, z, schedule=SD, solver=dataclasses.replace(base, step_limit=1.0), nfe=10, **kw
    ).x
    moved = (tight - free).norm(dim=1)
    assert float(moved.max()) > 1e-3  # it binds on some samples ...
    ddim = dp.sample(net, z, schedule=SD, solver=dp.Recipe("ddim", grid="logsnr"), nfe=10, **kw).x
    limited_ddim = dp.sample(
        net, z, schedule=SD, solver=dp.Recipe("ddim", grid="logsnr", step_limit=1.0), nfe=10, **kw
    ).x
    assert torch.allclose(limited_ddim, ddim, rtol=0, atol=1e-12)  # ... and first order is its own
    assert "step limit 1" in dataclasses.replace(base, step_limit=1.0).describe()


def test_stochastic_solvers_run_without_the_limit() -> None:
    net, z, kw = _guided()
    runs = []
    for limit in (None, 1.0):
        torch.manual_seed(3)
        recipe = dp.Recipe("dpmpp_2m_sde", grid="logsnr", step_limit=limit)
        runs.append(dp.sample(net, z, schedule=SD, solver=recipe, nfe=10, **kw).x)
    assert torch.equal(runs[0], runs[1])


def test_stage_d_keeps_the_limit_only_where_the_held_out_half_takes_it(
    patch_tune: Callable[[str, Any], None],
) -> None:
    pytest.importorskip("scipy")
    from tests.test_tune import CHEAP, COND, NET, Z

    nfes = [5, 8, 12]
    args = dict(schedule=SD, guidance_scale=7.5, nfe=nfes, **COND, **CHEAP)
    off = dp.tune(NET, Z, step_limit=None, **args)
    on = dp.tune(NET, Z, **args)
    for a, b in zip(on.choices, off.choices, strict=True):
        assert b.recipe.step_limit is None
        same = dataclasses.replace(
            a.with_recipe(step_limit=None), seconds=b.seconds, evaluations=b.evaluations
        )
        if a.recipe.step_limit is None:
            assert same == b  # refused: the choice of a tune without stage (d)
        else:
            assert a.heldout_error < b.heldout_error  # kept: better on the held-out half
    # where the held-out half takes it, the choice is the same recipe with the limit, scored
    # with it
    real = _accept

    def takes_limits(new, old, prob, worst_factor, **kw):  # type: ignore[no-untyped-def]
        return new.recipe.step_limit is not None or real(new, old, prob, worst_factor, **kw)

    patch_tune("_accept", takes_limits)
    forced = dp.tune(NET, Z, step_limit=1.0, guard_rows=0, **args)
    plain = dp.tune(NET, Z, step_limit=None, guard_rows=0, **args)
    differs = 0
    for a, b in zip(forced.choices, plain.choices, strict=True):
        assert a.recipe.step_limit == 1.0
        fields = ("solver", "options", "timesteps", "grid", "model_shifts", "sigma_end")
        assert a.stage == b.stage
        assert all(getattr(a.recipe, f) == getattr(b.recipe, f) for f in fields)
        x = dp.sample(
            NET,
            Z,
            schedule=SD,
            solver="auto",
            nfe=a.nfe,
            profile=forced,
            **COND,
            guidance_scale=7.5,
        ).x
        y = dp.sample(
            NET, Z, schedule=SD, solver="auto", nfe=a.nfe, profile=plain, **COND, guidance_scale=7.5
        ).x
        if a.heldout_error != b.heldout_error:
            differs += 1
            assert not torch.equal(x, y)  # the profile samples with the limit it was scored with
    assert differs > 0  # a limit of 1 binds on this problem's held-out rows somewhere
    assert dp.Profile.from_json(forced.to_json()) == forced
    # a version-5 file (no step limit) still loads
    data = off.to_json()
    data["format"] = "dpmsolver-profile/5"
    for c in data["choices"]:
        del c["step_limit"]
    assert dp.Profile.from_json(data).choices[0].recipe.step_limit is None


def _scheduler_run(profile: dp.Profile, z: torch.Tensor, nfe: int) -> torch.Tensor:
    from dpmsolver.frontends.diffusers_scheduler import DPMSolverScheduler
    from tests.test_tune import NET

    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sched = DPMSolverScheduler(solver="auto", guidance_scale=1.0, profile=profile, **sd)
    sched.set_timesteps(nfe)
    x = z * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(NET(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x


def _profiles(solver: str, options: dict, limit: float) -> tuple[dp.Profile, dp.Profile]:
    from tests.test_tune import CHEAP, NET, Z

    prof = dp.tune(NET, Z, schedule=SD, nfe=[9], shift_runs=0, norm_cap=None, **CHEAP)
    c = prof.choices[0].with_recipe(
        solver=solver, options=options, grid="logsnr", rho=None, timesteps=None
    )
    free, limited = (
        dataclasses.replace(prof, choices=(c.with_recipe(step_limit=v),)) for v in (None, limit)
    )
    return free, limited


def test_the_diffusers_scheduler_limits_as_sample_does() -> None:
    pytest.importorskip("scipy")
    pytest.importorskip("diffusers")
    from tests.test_tune import NET, Z

    free_prof, tight_prof = _profiles("unipc", {"order": 2}, 1.0)
    z = Z[:6]
    free = dp.sample(NET, z, schedule=SD, solver="auto", nfe=9, profile=free_prof).x
    tight = dp.sample(NET, z, schedule=SD, solver="auto", nfe=9, profile=tight_prof).x
    assert float((tight - free).abs().max()) > 1e-3  # a limit of 1 binds here
    got_tight, got_free = (_scheduler_run(p, z, 9) for p in (tight_prof, free_prof))
    # the config's betas are float32, which moves both runs alike (~2e-3 here); what the
    # limit changes must be what it changes in sample()
    assert float((got_free - free).abs().max()) < 5e-3
    change = float((tight - free).abs().max())
    assert float(((got_tight - got_free) - (tight - free)).abs().max()) < 0.15 * change


def test_the_scheduler_limits_a_singlestep_step_from_its_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A singlestep step spans several scheduler calls: the limit must see the state and
    data prediction at the step's start and the state at its end, as the loop gives them."""
    pytest.importorskip("scipy")
    pytest.importorskip("diffusers")
    from tests.test_tune import NET, Z

    _, prof = _profiles("dpmpp_2s", {}, 1e9)
    seen: list[tuple[float, float, torch.Tensor, torch.Tensor]] = []
    real = StepLimit.apply

    def spy(self, x, x0, x_next, s, t, index):  # type: ignore[no-untyped-def]
        if math.isfinite(t.lam):
            seen.append((s.lam, t.lam, x.clone(), x0.clone()))
        return real(self, x, x0, x_next, s, t, index)

    monkeypatch.setattr(StepLimit, "apply", spy)
    z = Z[:4]
    dp.sample(NET, z, schedule=SD, solver="auto", nfe=9, profile=prof)
    loop, seen[:] = list(seen), []
    _scheduler_run(prof, z, 9)
    assert len(loop) == len(seen) == 4  # 4 two-evaluation steps, then the step to sigma = 0
    for (a_s, a_t, a_x, a_x0), (b_s, b_t, b_x, b_x0) in zip(loop, seen, strict=True):
        assert a_s == pytest.approx(b_s, abs=1e-4) and a_t == pytest.approx(b_t, abs=1e-4)
        # (the config's float32 betas move the scheduler's run by well under 1%; a state from
        # the step's intermediate point would be off by far more)
        assert torch.allclose(a_x, b_x, rtol=1e-2, atol=1e-3)
        assert torch.allclose(a_x0, b_x0, rtol=1e-2, atol=1e-3)
