"""Time grids: spacings, explicit ends, custom grids, and their errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import dpmsolver as dp

SD = dp.DiscreteVPSchedule()


@pytest.mark.parametrize("kind", dp.GRID_KINDS)
@pytest.mark.parametrize("final", ["zero", "t_min"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_grid_shape_and_monotone(kind: str, final: str, steps: int) -> None:
    g = dp.make_grid(SD, steps, kind, final=final)  # type: ignore[arg-type]
    assert g.steps == steps
    lams = [k.lam for k in g.knots]
    assert all(b > a for a, b in itertools.pairwise(lams))
    assert g.knots[0].t == SD.t_max
    if final == "zero":
        assert g.final_zero and g.knots[-1].sigma == 0.0
        if steps > 1:
            # time-spaced grids run to t = 0: the last noisy knot is one spacing before it
            last = {
                "time_uniform": SD.t_max / steps,
                "time_quadratic": (SD.t_max**0.5 / steps) ** 2,
            }.get(kind, SD.t_min)
            assert g.knots[-2].t == pytest.approx(last)
    else:
        assert not g.final_zero and g.knots[-1].t == pytest.approx(SD.t_min)


def test_spacings_follow_their_definitions() -> None:
    n = 10
    g = dp.make_grid(SD, n, "logsnr", final="t_min")
    d = [b.lam - a.lam for a, b in zip(g.knots, g.knots[1:], strict=False)]
    assert max(d) - min(d) < 1e-9
    g = dp.make_grid(SD, n, "time_uniform", final="t_min")
    assert [k.t for k in g.knots] == pytest.approx(
        torch.linspace(999, 0, n + 1, dtype=torch.float64).tolist()
    )
    g = dp.make_grid(SD, n, "time_quadratic", final="t_min")
    assert [math.sqrt(k.t) for k in g.knots] == pytest.approx(
        torch.linspace(999**0.5, 0, n + 1, dtype=torch.float64).tolist(), abs=1e-9
    )
    # Karras (EDM Eq. 5) in k-diffusion sigmas, rho = 7
    g = dp.make_grid(SD, n, "karras", final="t_min")
    smax, smin = g.knots[0].ksigma, g.knots[-1].ksigma
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    expected = (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    assert [k.ksigma for k in g.knots] == pytest.approx(expected.tolist(), rel=1e-9)
    # polyexponential with rho = 1 is logsnr, exponential is logsnr
    for other in ("exponential", "polyexponential"):
        g2 = dp.make_grid(SD, n, other, final="t_min")  # type: ignore[arg-type]
        assert [k.lam for k in g2.knots] == pytest.approx(
            [k.lam for k in dp.make_grid(SD, n, final="t_min").knots]
        )


def test_flow_shift_reproduces_sd3_spacing() -> None:
    s = dp.RectifiedFlowSchedule(shift=3.0, t_max=1.0)
    g = dp.make_grid(s, 4, "time_uniform", t_start=1.0, t_end=0.25, final="zero")
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    assert [k.sigma for k in g.knots[:-1]] == pytest.approx((3 * t / (1 + 2 * t)).tolist())
    assert g.knots[0].lam == -math.inf  # asked for: pure noise


def test_default_flow_grid_starts_as_diffusers_flow_multistep_schedulers() -> None:
    """1 - 1/1000 in unshifted time, uniform to 0 (diffusers' DPMSolverMultistepScheduler
    with use_flow_sigmas: linspace(1, 1/1000, n + 1) -> sigmas 1 - that, the last dropped)."""
    s = dp.RectifiedFlowSchedule(shift=3.0)
    g = dp.make_grid(s, 4, "time_uniform")
    t = torch.linspace(0.999, 0, 5, dtype=torch.float64)[:-1]
    assert [k.sigma for k in g.knots[:-1]] == pytest.approx((3 * t / (1 + 2 * t)).tolist())
    assert math.isfinite(g.knots[0].lam) and g.final_zero


def test_custom_grids() -> None:
    g = dp.grid_from_timesteps(SD, [999, 700, 300, 10], final="zero")
    assert g.steps == 4 and g.final_zero and g.times[:4] == [999, 700, 300, 10]
    g = dp.grid_from_sigmas(SD, [14.6, 3.0, 0.5, 0.0])
    assert g.final_zero and g.ksigmas == pytest.approx([14.6, 3.0, 0.5, 0.0])
    inv = dp.grid_from_timesteps(SD, [0, 100, 999])
    assert inv.is_inversion and inv.steps == 2


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: dp.make_grid(SD, 0), "steps must be >= 1"),
        (lambda: dp.make_grid(SD, 2.5), "steps must be an integer"),  # type: ignore[arg-type]
        (lambda: dp.make_grid(SD, 10, "cosine"), "grid='cosine'"),  # type: ignore[arg-type]
        (lambda: dp.make_grid(SD, 10, final="end"), "final='end'"),  # type: ignore[arg-type]
        (lambda: dp.make_grid(SD, 10, t_start=100, t_end=200), "t_start=100"),
        (lambda: dp.make_grid(SD, 10, t_end=-5), "t_end=-5"),
        (lambda: dp.make_grid(SD, 10, t_start=float("nan")), "t_start must be finite"),
        (lambda: dp.make_grid(SD, 10, "karras", rho=0.0), "rho must be > 0"),
        (lambda: dp.grid_from_timesteps(SD, [999, 500, 500, 10]), "strictly monotone"),
        (lambda: dp.grid_from_timesteps(SD, [999, 100, 500]), "strictly monotone"),
        (lambda: dp.grid_from_timesteps(SD, [999, 1500]), r"timesteps\[1\]=1500"),
        (lambda: dp.grid_from_timesteps(SD, [999]), "at least 2 knots"),
        (lambda: dp.grid_from_sigmas(SD, [10.0, 0.0, 1.0]), "sigma 0 may only be the last"),
        (lambda: dp.grid_from_sigmas(SD, [10.0, -1.0]), r"sigmas\[1\]"),
        (
            lambda: dp.grid_from_sigmas(dp.RectifiedFlowSchedule(), [1.0, 2.0]),
            "flow sigma range",
        ),
    ],
)
def test_bad_grids_are_explained(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_flow_grids_start_and_end_like_diffusers() -> None:
    """A 10-step flow grid (shift 3) is diffusers' DPMSolverMultistep one: uniform in time
    from t = 0.999 (sigma 0.9997), the last noisy sigma 0.25, then sigma 0; asked to,
    it starts at pure noise as FlowMatchEuler does."""
    flow = dp.RectifiedFlowSchedule(shift=3.0)
    g = dp.make_grid(flow, 10, "time_uniform")
    sig = [k.sigma for k in g.knots]
    assert sig[-1] == 0.0 and sig[-2] == pytest.approx(0.25, abs=1e-3)
    ts = torch.linspace(0.999, 0, 11, dtype=torch.float64).tolist()
    assert sig == pytest.approx([3 * t / (1 + 2 * t) for t in ts], abs=1e-6)  # t_min > 0
    assert dp.default_grid(flow) == "time_uniform" and dp.default_grid(SD) == "logsnr"
    g = dp.make_grid(flow, 10, "time_uniform", t_start=flow.t_max)
    assert g.knots[0].sigma == 1.0 and g.knots[-2].sigma == pytest.approx(0.25)
    # grids spaced in noise level start there too; from pure noise with a first-order step,
    # then their spacing
    for kind in ("logsnr", "karras", "polyexponential"):
        h = dp.make_grid(flow, 6, kind)  # type: ignore[arg-type]
        assert h.knots[0].t == pytest.approx(0.999, abs=1e-5) and h.steps == 6 and h.final_zero
        h = dp.make_grid(flow, 6, kind, t_start=flow.t_max)  # type: ignore[arg-type]
        assert h.knots[0].alpha == 0.0 and h.steps == 6 and h.final_zero


@pytest.mark.parametrize("kind", ["time_uniform", "time_quadratic"])
def test_many_steps_keep_the_last_noisy_knot_in_the_schedule(kind: str) -> None:
    flow = dp.RectifiedFlowSchedule()
    g = dp.make_grid(flow, 5000, kind)  # type: ignore[arg-type]
    assert g.knots[-2].t == pytest.approx(flow.t_min)


def test_custom_sigmas_follow_the_family_convention() -> None:
    flow = dp.RectifiedFlowSchedule(shift=3.0)
    g = dp.grid_from_sigmas(flow, [1.0, 0.75, 0.5, 0.25, 0.0])
    assert [k.sigma for k in g.knots] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    k = dp.grid_from_sigmas(flow, [3.0, 1.0, 1 / 3, 0.0], convention="k")
    assert [x.sigma for x in k.knots] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    with pytest.raises(
        ValueError, match=r"sigmas\[1\]=1.5 is outside this schedule's flow sigma range"
    ):
        dp.grid_from_sigmas(flow, [1.0, 1.5, 0.0])
    with pytest.raises(ValueError, match=r"sigmas\[0\]=-0.1 is outside"):
        dp.grid_from_sigmas(flow, [-0.1])
    with pytest.raises(
        ValueError, match=r"sigmas\[0\]=30 is outside this schedule's sigma .k-diffusion"
    ):
        dp.grid_from_sigmas(SD, [30.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"t_start=1\.5 is outside"):
        dp.make_grid(flow, 4, t_start=1.5)
