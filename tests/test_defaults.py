"""Every schedule x prediction samples with the defaults (#15): ``sample(net, noise,
schedule=..., prediction=...)`` with no other argument, and with ``solver="auto"``, gives
a finite sample close to the exact one, and the same sample whatever the network predicts
(the predictions are exact conversions of one another)."""

from __future__ import annotations

import functools

import pytest
import torch

import dpmsolver as dp
from dpmsolver.analytic import MixtureNetwork, default_mixture, exact_sample
from dpmsolver.sampling import build_denoiser
from dpmsolver.schedules import DiscreteVPSchedule, NoiseSchedule, make_schedule

SCHEDULES: dict[str, NoiseSchedule] = {
    "discrete_sd": DiscreteVPSchedule(),
    "discrete_zero_snr": DiscreteVPSchedule(rescale_zero_terminal_snr=True),
    "vp_linear": make_schedule("vp_linear"),
    "vp_cosine": make_schedule("vp_cosine"),
    "edm": make_schedule("edm"),
    "flow": make_schedule("flow"),
    "flow_shift3": make_schedule("flow", shift=3.0),
}
MIXTURE = default_mixture(dim=8, num_classes=1, components_per_class=3, seed=1, shape=(8,))
NOISE = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
# Measured with this mixture (stds down to 0.05, so the last steps are the hard ones) at the
# default 20 steps: at most 0.11 (dpmpp_2m) and 0.03 (auto). A wrong parameterization,
# grid or start scale is off by O(1) (an unscaled VE start measured 1.2).
BOUND = {"dpmpp_2m": 0.25, "auto": 0.1}


@functools.cache
def reference(name: str) -> torch.Tensor:
    s = SCHEDULES[name]
    den = build_denoiser(MixtureNetwork(MIXTURE, s, "x0"), "x0")
    return exact_sample(den, NOISE * s.knot(s.t_max).sigma, s, rtol=1e-7)


@functools.cache
def run(name: str, prediction: str, solver: str | None) -> torch.Tensor:
    s = SCHEDULES[name]
    net = MixtureNetwork(MIXTURE, s, prediction)  # type: ignore[arg-type]
    kw = {} if solver is None else {"solver": solver}
    return dp.sample(net, NOISE, schedule=s, prediction=prediction, **kw).x  # type: ignore[arg-type]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("solver", [None, "auto"])
@pytest.mark.parametrize("prediction", dp.PREDICTIONS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_defaults_sample_every_schedule_and_prediction(
    name: str, prediction: str, solver: str | None
) -> None:
    x = run(name, prediction, solver)
    assert x.shape == NOISE.shape and bool(torch.isfinite(x).all())
    err = rel(x, reference(name))
    assert err < BOUND[solver or "dpmpp_2m"], f"{name} {prediction} {solver}: error {err:.3g}"
    # x0, v and flow outputs are exact conversions of one another: the same sample. eps and
    # score say nothing at pure noise, so on flow schedules they start one step later.
    twin = "x0" if prediction in ("v", "flow") else ("eps" if prediction == "score" else None)
    if twin is not None:
        assert rel(x, run(name, twin, solver)) < 1e-9
    starts_at_pure_noise = SCHEDULES[name].knot(SCHEDULES[name].t_max).alpha == 0.0
    if prediction == "eps" and not starts_at_pure_noise:
        assert rel(x, run(name, "x0", solver)) < 1e-9


def test_default_solver_is_unipc_on_rectified_flow_and_dpmpp_2m_elsewhere() -> None:
    """``sample`` with no solver named runs the schedule's ``default_solver``: on rectified
    flow UniPC (2M predictor plus the UniC corrector; benchmarks/flow.md measured it at
    0.51-0.92x DPM-Solver++ 2M on the flow digits model), elsewhere DPM-Solver++ 2M."""
    for name, s in SCHEDULES.items():
        flow = name.startswith("flow")
        assert dp.default_solver(s) == ("unipc" if flow else "dpmpp_2m")
        assert rel(run(name, "x0", None), run(name, "x0", dp.default_solver(s))) < 1e-12
    # and the two really differ on flow (the corrector changes the sample)
    assert rel(run("flow", "x0", "unipc"), run("flow", "x0", "dpmpp_2m")) > 1e-6


def test_strong_guidance_keeps_dpmpp_2m_on_flow() -> None:
    """From guidance 5 the flow default is DPM-Solver++ 2M again (the corrector made a
    guided flow mixture diverge there; benchmarks/flow_mixtures.md), and ``sample`` passes
    its guidance scale (the largest of a per-sample tensor) to the choice."""
    flow = SCHEDULES["flow"]
    assert dp.default_solver(flow, 3.0) == "unipc"
    assert dp.default_solver(flow, 5.0) == dp.default_solver(flow, 7.5) == "dpmpp_2m"
    assert dp.default_solver(SCHEDULES["vp_linear"], 1.0) == "dpmpp_2m"
    net = _Labelled(MixtureNetwork(MIXTURE, flow, "x0"))
    cond = {"y": torch.zeros(8, dtype=torch.long)}

    def run_flow(w: float | torch.Tensor, **solver: str) -> torch.Tensor:
        return dp.sample(
            net,
            NOISE,
            schedule=flow,
            prediction="x0",
            cond=cond,
            uncond=cond,
            guidance_scale=w,
            nfe=6,
            **solver,  # type: ignore[arg-type]
        ).x

    for w, name in (
        (3.0, "unipc"),
        (7.5, "dpmpp_2m"),
        (torch.tensor([1.0] * 7 + [7.5]), "dpmpp_2m"),
    ):
        assert torch.equal(run_flow(w), run_flow(w, solver=name)), (w, name)


class _Labelled:
    """The mixture network taking (and ignoring) a label keyword, so guidance runs."""

    def __init__(self, net: MixtureNetwork) -> None:
        self.net = net

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)
