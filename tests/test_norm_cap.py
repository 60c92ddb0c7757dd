"""The per-sample bound on the data prediction's norm (dpmsolver.guidance.NormCap) and the
envelope a tuned profile sets it from (dpmsolver.tune, TuneOptions.norm_cap)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import dpmsolver as dp
from dpmsolver.guidance import NormCap
from dpmsolver.schedules import Knot
from dpmsolver.tune.options import CAP_BINS
from dpmsolver.tune.pilot import _Envelope

SD = dp.DiscreteVPSchedule()


def _constant(value: float) -> dp.Denoiser:
    def den(x: torch.Tensor, knot: Knot) -> torch.Tensor:
        return torch.full_like(x, value)

    return den


def test_the_cap_is_interpolated_in_log_snr_and_held_beyond_the_ends() -> None:
    cap = NormCap(_constant(0.0), [(-2.0, 1.0), (0.0, 3.0), (4.0, 5.0)])
    assert cap.cap_at(-math.inf) == 1.0 and cap.cap_at(-5.0) == 1.0
    assert cap.cap_at(-1.0) == pytest.approx(2.0)
    assert cap.cap_at(2.0) == pytest.approx(4.0)
    assert cap.cap_at(4.0) == 5.0 and cap.cap_at(math.inf) == 5.0


def test_only_samples_over_the_cap_change_and_they_end_on_it() -> None:
    x0 = torch.tensor([[3.0, 4.0], [0.3, 0.4], [30.0, -40.0], [math.nan, 1.0], [math.inf, 1.0]])
    cap = NormCap(_constant(0.0), [(0.0, 2.0)])
    out = cap.bound(x0, 0.0)
    assert torch.equal(out[1], x0[1])  # under the cap: bit for bit
    for i in (0, 2):
        assert float(out[i].norm()) == pytest.approx(2.0)
        assert float(torch.dot(out[i], x0[i])) > 0  # scaled, not turned
    # non-finite samples pass unchanged, for the loop to report
    assert math.isnan(float(out[3, 0])) and torch.equal(out[4], x0[4])
    half = cap.bound(x0.half(), 0.0)
    assert half.dtype == torch.float16 and float(half[0].float().norm()) == pytest.approx(2.0, 1e-3)


@pytest.mark.parametrize(
    ("cap", "match"),
    [
        ([], "at least one"),
        ([(0.0, -1.0)], "caps > 0"),
        ([(0.0, 1.0), (0.0, 2.0)], "increase strictly"),
        ([(math.inf, 1.0)], "finite"),
        ([1.0, 2.0], "sequence of \\(lambda, cap\\) pairs"),
    ],
)
def test_bad_caps_are_named(cap: object, match: str) -> None:
    with pytest.raises(ValueError, match=f"x0_norm_cap.*{match}|{match}"):
        dp.Recipe("ddim", x0_norm_cap=cap)  # type: ignore[arg-type]


def test_sample_applies_a_recipes_cap_and_a_loose_one_changes_nothing() -> None:
    mix = dp.default_mixture(dim=4, num_classes=2, components_per_class=2, seed=1)
    net = dp.MixtureNetwork(mix, SD, "eps")
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(8) % 2
    kw = dict(cond={"y": y}, uncond={"y": torch.full_like(y, 2)}, guidance_scale=7.5)
    base = dp.Recipe("dpmpp_2m", grid="logsnr")
    free = dp.sample(net, z, schedule=SD, solver=base, nfe=10, **kw).x
    loose = dataclasses.replace(base, x0_norm_cap=((0.0, 1e6),))
    assert torch.equal(dp.sample(net, z, schedule=SD, solver=loose, nfe=10, **kw).x, free)
    tight = dataclasses.replace(base, x0_norm_cap=((-5.0, 0.05), (5.0, 0.5)))
    x = dp.sample(net, z, schedule=SD, solver=tight, nfe=10, **kw).x
    # the last step is the data prediction at the last knot (lambda > 5): capped at 0.5
    assert float(x.norm(dim=1).max()) <= 0.5 * (1 + 1e-9)
    assert float(free.norm(dim=1).max()) > 0.5


def test_the_envelope_is_the_largest_norm_per_bin_widened_to_its_neighbours() -> None:
    env = _Envelope(_constant(0.0))
    x = torch.zeros(3, 2, dtype=torch.float64)
    for lam, v in [(0.0, 1.0), (0.1, 2.0), (3.2, 5.0), (6.25, 1.0), (6.4, 1.0), (-math.inf, 100.0)]:
        env.denoiser = _constant(v / math.sqrt(2))  # a row's norm is v
        env(x, Knot(t=0.5, lam=lam, alpha=0.5, sigma=0.5, model_t=0.5))
    knots = env.knots(bins=64)
    lams = [a for a, _ in knots]
    assert len(knots) == 64 and lams == sorted(lams)
    assert lams[0] == pytest.approx(6.4 / 128) and lams[-1] == pytest.approx(6.4 - 6.4 / 128)
    by_bin = [v for _, v in knots]
    assert by_bin[0] == pytest.approx(2.0)  # bins 0 and 1 hold 1.0 and 2.0: widened
    assert by_bin[31] == pytest.approx(5.0) and by_bin[33] == pytest.approx(5.0)
    assert by_bin[16] == pytest.approx(5.0)  # empty: its nearest filled bins' largest
    assert by_bin[-1] == pytest.approx(1.0)
    assert max(by_bin) == pytest.approx(5.0)  # the pure-noise evaluation is not recorded
    assert CAP_BINS >= 16


def test_a_profile_carries_the_cap_and_norm_cap_none_drops_it(tmp_path: object) -> None:
    pytest.importorskip("scipy")
    from tests.test_tune import CHEAP, COND, NET, Z

    prof = dp.tune(NET, Z, schedule=SD, guidance_scale=5.0, nfe=[5], **COND, **CHEAP)
    c = prof.choices[0]
    assert c.recipe.x0_norm_cap is not None and len(c.recipe.x0_norm_cap) == CAP_BINS
    # 3 x the norms of the exact trajectories: the reference's final samples are under it
    ref = dp.sample(NET, Z, schedule=SD, solver="dpmpp_2m", nfe=200, **COND).x
    assert float(ref.norm(dim=1).max()) < c.recipe.x0_norm_cap[-1][1]
    again = dp.Profile.from_json(prof.to_json())
    assert again == prof
    off = dp.tune(NET, Z, schedule=SD, guidance_scale=5.0, nfe=[5], norm_cap=None, **COND, **CHEAP)
    assert off.choices[0].recipe.x0_norm_cap is None
    # what is chosen does not depend on the cap (it applies when sampling)
    same = dataclasses.replace(
        off.choices[0].with_recipe(x0_norm_cap=c.recipe.x0_norm_cap), seconds=c.seconds
    )
    assert dataclasses.replace(same, evaluations=c.evaluations) == c
    with pytest.raises(ValueError, match="norm_cap must be >= 1 or None"):
        dp.tune(NET, Z, schedule=SD, nfe=[5], norm_cap=0.5, **COND)


def test_a_version_4_profile_loads_without_a_cap() -> None:
    pytest.importorskip("scipy")
    from tests.test_tune import CHEAP, COND, NET, Z

    prof = dp.tune(NET, Z, schedule=SD, guidance_scale=3.0, nfe=[5], **COND, **CHEAP)
    data = prof.to_json()
    data["format"] = "dpmsolver-profile/4"
    for c in data["choices"]:
        del c["x0_norm_cap"]
    old = dp.Profile.from_json(data)
    assert old.choices[0].recipe.x0_norm_cap is None


def test_the_diffusers_scheduler_caps_as_sample_does() -> None:
    pytest.importorskip("scipy")
    pytest.importorskip("diffusers")
    from dpmsolver.frontends.diffusers_scheduler import DPMSolverScheduler
    from tests.test_tune import CHEAP, NET, Z

    prof = dp.tune(NET, Z, schedule=SD, nfe=[8], shift_runs=0, **CHEAP)
    c = prof.choices[0]
    assert c.recipe.x0_norm_cap is not None
    # a cap low enough to bind at every knot, so that applying it or not shows
    tight = tuple((lam, 0.3) for lam, _ in c.recipe.x0_norm_cap)
    capped = dataclasses.replace(prof, choices=(c.with_recipe(x0_norm_cap=tight),))
    z = Z[:6]
    want = dp.sample(NET, z, schedule=SD, solver="auto", nfe=8, profile=capped).x
    free = dp.sample(NET, z, schedule=SD, solver="auto", nfe=8, profile=prof).x
    assert float((want - free).abs().max()) > 0.1
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    for profile, expected in ((capped, want), (prof, free)):
        sched = DPMSolverScheduler(solver="auto", guidance_scale=1.0, profile=profile, **sd)
        sched.set_timesteps(8)
        x = z * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(NET(sched.scale_model_input(x, t), t), t, x).prev_sample
        # the config's betas are float32 (up to ~1e-3 here); the cap moves samples by > 0.1
        assert float((x - expected).abs().max()) < 5e-3
