"""Schedules: round trips, exact knots, presets, identities."""

from __future__ import annotations

import math

import pytest
import torch

import dpmsolver as dp
from dpmsolver.schedules import betas_for_preset, zero_terminal_snr

SCHEDULES = {
    "discrete_sd": dp.DiscreteVPSchedule(),
    "discrete_linear": dp.DiscreteVPSchedule(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02
    ),
    "discrete_cos": dp.DiscreteVPSchedule(beta_schedule="squaredcos_cap_v2"),
    "discrete_zsnr": dp.DiscreteVPSchedule(rescale_zero_terminal_snr=True),
    "vp_linear": dp.ContinuousVPSchedule("linear"),
    "vp_cosine": dp.ContinuousVPSchedule("cosine"),
    "edm": dp.VESchedule(),
    "ve": dp.VESchedule(0.01, 50.0),
    "flow": dp.RectifiedFlowSchedule(),
    "flow_shift3": dp.RectifiedFlowSchedule(shift=3.0),
}


def interior_times(s: dp.NoiseSchedule, n: int = 41) -> torch.Tensor:
    hi = s.t_max if math.isfinite(s.knot(s.t_max).lam) else s.t_max - 1e-3
    return torch.linspace(s.t_min, hi, n, dtype=torch.float64)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_round_trip_t_lambda_t(name: str) -> None:
    s = SCHEDULES[name]
    t = interior_times(s)
    back = s.t_of_lambda(s.lambda_(t))
    assert torch.allclose(back, t, rtol=1e-9, atol=1e-9 * max(1.0, s.t_max)), (t - back).abs().max()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lambda_is_log_alpha_over_sigma_and_increases_towards_data(name: str) -> None:
    s = SCHEDULES[name]
    t = interior_times(s)
    lam = s.lambda_(t)
    assert torch.allclose(lam, torch.log(s.alpha(t) / s.sigma(t)), atol=1e-10)
    assert bool((lam[1:] < lam[:-1]).all())  # t increases -> noisier


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_knot_at_lambda_agrees_with_knot(name: str) -> None:
    s = SCHEDULES[name]
    for t in interior_times(s, 9).tolist():
        k = s.knot(t)
        k2 = s.knot_at_lambda(k.lam)
        assert k2.t == pytest.approx(k.t, rel=1e-9, abs=1e-9)
        assert k2.alpha == pytest.approx(k.alpha, rel=1e-9, abs=1e-12)
        assert k2.sigma == pytest.approx(k.sigma, rel=1e-9, abs=1e-12)
        assert k2.model_t == pytest.approx(k.model_t, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_model_time_round_trip(name: str) -> None:
    s = SCHEDULES[name]
    t = interior_times(s)
    assert torch.allclose(s.t_of_model_time(s.model_time(t)), t, rtol=1e-12, atol=1e-12)


def test_family_identities() -> None:
    for name in ("discrete_sd", "discrete_cos", "vp_linear", "vp_cosine"):
        s = SCHEDULES[name]
        t = interior_times(s)
        assert torch.allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t), atol=1e-12), (
            name
        )
    ve = SCHEDULES["edm"]
    t = interior_times(ve)
    assert torch.equal(ve.alpha(t), torch.ones_like(t)) and torch.allclose(ve.sigma(t), t)
    fl = SCHEDULES["flow_shift3"]
    t = interior_times(fl)
    shifted = 3 * t / (1 + 2 * t)
    assert torch.allclose(fl.sigma(t), shifted) and torch.allclose(fl.alpha(t), 1 - shifted)
    assert torch.allclose(fl.model_time(t), 1000 * shifted)


def test_discrete_knots_are_exact() -> None:
    s = SCHEDULES["discrete_sd"]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    ts = torch.tensor([0.0, 1.0, 10.0, 500.0, 998.0, 999.0], dtype=torch.float64)
    idx = ts.long()
    assert torch.allclose(s.alpha(ts) ** 2, acp[idx], rtol=1e-12)
    assert torch.allclose(s.sigma(ts) ** 2, 1 - acp[idx], rtol=1e-12)
    # between knots, log(sigma/alpha) is linear in t
    mid = s.lambda_(torch.tensor(10.5, dtype=torch.float64))
    assert float(mid) == pytest.approx(
        0.5 * float(s.lambda_(torch.tensor(10.0)) + s.lambda_(torch.tensor(11.0)))
    )


def test_presets_match_their_formulas() -> None:
    lin = betas_for_preset("linear", 1000, 1e-4, 0.02)
    assert torch.allclose(lin, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    cos = betas_for_preset("squaredcos_cap_v2", 1000)

    def abar(x: float) -> float:
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

    assert float(cos[10]) == pytest.approx(1 - abar(11 / 1000) / abar(10 / 1000))
    assert float(cos.max()) <= 0.999


def test_zero_terminal_snr_rescaling() -> None:
    base = dp.DiscreteVPSchedule().alphas_cumprod
    z = zero_terminal_snr(base.clone())
    assert float(z[0]) == pytest.approx(float(base[0]), rel=1e-12)
    assert float(z[-1]) == 2.0**-24
    assert math.isfinite(dp.DiscreteVPSchedule(rescale_zero_terminal_snr=True).knot(999.0).lam)


def test_cosine_inverse_is_closed_form() -> None:
    s = SCHEDULES["vp_cosine"]
    lam = torch.linspace(-5, 8, 27, dtype=torch.float64)
    assert torch.allclose(s.lambda_(s.t_of_lambda(lam)), lam, atol=1e-9)


def test_special_knots() -> None:
    flow = SCHEDULES["flow"]
    pure = flow.knot(1.0)
    assert pure.lam == -math.inf and pure.alpha == 0.0 and pure.sigma == 1.0
    z = flow.zero_knot()
    assert z.lam == math.inf and z.sigma == 0.0 and z.alpha == 1.0


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: dp.DiscreteVPSchedule(beta_schedule="cubic"), "beta_schedule"),
        (lambda: dp.DiscreteVPSchedule(betas=torch.tensor([0.1, 1.5])), "betas"),
        (lambda: dp.DiscreteVPSchedule(alphas_cumprod=torch.tensor([0.5, 0.9])), "alphas_cumprod"),
        (lambda: dp.ContinuousVPSchedule("quadratic"), "kind"),  # type: ignore[arg-type]
        (lambda: dp.VESchedule(sigma_min=5.0, sigma_max=1.0), "sigma_min"),
        (lambda: dp.VESchedule(sigma_min=float("nan")), "sigma_min"),
        (lambda: dp.RectifiedFlowSchedule(shift=-1.0), "shift"),
        (lambda: dp.make_schedule("karras"), "schedule"),  # type: ignore[arg-type]
    ],
)
def test_bad_schedule_arguments(factory, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        factory()


def test_make_schedule_builds_each_family() -> None:
    assert isinstance(dp.make_schedule("discrete"), dp.DiscreteVPSchedule)
    assert dp.make_schedule("vp_cosine").kind == "cosine"  # type: ignore[attr-defined]
    assert isinstance(dp.make_schedule("edm"), dp.VESchedule)
    assert dp.make_schedule("flow", shift=3.0).shift == 3.0  # type: ignore[attr-defined]


def test_time_out_of_range_is_reported() -> None:
    with pytest.raises(ValueError, match="t_start=1200"):
        dp.make_grid(dp.DiscreteVPSchedule(), 10, t_start=1200.0)


@pytest.mark.parametrize(
    ("preset", "start", "end"), [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)]
)
def test_each_beta_preset_has_its_own_endpoints(preset: str, start: float, end: float) -> None:
    """DDPM's linear schedule is 1e-4..0.02, Stable Diffusion's scaled-linear 0.00085..0.012
    (as diffusers' configs); explicit endpoints still win."""
    sched = dp.DiscreteVPSchedule(beta_schedule=preset)  # type: ignore[arg-type]
    explicit = dp.DiscreteVPSchedule(beta_schedule=preset, beta_start=start, beta_end=end)  # type: ignore[arg-type]
    assert torch.equal(sched.alphas_cumprod, explicit.alphas_cumprod)
    other = dp.DiscreteVPSchedule(beta_schedule=preset, beta_start=start * 2, beta_end=end)  # type: ignore[arg-type]
    assert not torch.equal(sched.alphas_cumprod, other.alphas_cumprod)


diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            rescale_betas_zero_snr=True,
        ),
        dict(trained_betas=torch.linspace(1e-4, 0.03, 500).tolist(), num_train_timesteps=500),
    ],
    ids=["ddpm", "sd", "cosine", "zero-snr", "trained"],
)
def test_schedule_from_a_diffusers_config_is_the_one_diffusers_builds(config: dict) -> None:
    sched = diffusers.DPMSolverMultistepScheduler(**config)
    ours = dp.schedule_from_diffusers_config(sched.config)
    assert isinstance(ours, dp.DiscreteVPSchedule)
    assert torch.equal(ours.alphas_cumprod, sched.alphas_cumprod.double())


def test_flow_configs_give_a_shifted_rectified_flow_schedule() -> None:
    fm = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = dp.schedule_from_diffusers_config(fm.config)
    assert isinstance(sched, dp.RectifiedFlowSchedule) and sched.shift == 3.0
    assert dp.prediction_from_diffusers_config(fm.config) == "flow"
    # the flow sigma at the config's timestep t is shift*s/(1+(shift-1)s) with s = t/1000
    k = sched.knot(0.5)
    assert abs(k.sigma - 0.75) < 1e-12 and abs(k.model_t - 750.0) < 1e-9
    dpm = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"
    )
    assert dp.schedule_from_diffusers_config(dpm.config).shift == 5.0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        dp.schedule_from_diffusers_config(
            diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
        )
    assert dp.prediction_from_diffusers_config({"prediction_type": "v_prediction"}) == "v"
    with pytest.raises(ValueError, match="prediction_type='x'"):
        dp.prediction_from_diffusers_config({"prediction_type": "x"})


def test_which_schedules_start_at_pure_noise() -> None:
    assert dp.RectifiedFlowSchedule().starts_at_pure_noise
    for sched in (dp.DiscreteVPSchedule(), dp.VESchedule(), dp.ContinuousVPSchedule()):
        assert not sched.starts_at_pure_noise
