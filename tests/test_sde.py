"""Stochastic solvers: distribution-level tests on the exact mixture, zero noise = ODE,
per-sample reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

import dpmsolver as dp
from dpmsolver.noise import SeededNoise
from dpmsolver.orders import SDE_MIXTURE, marginal_samples, sde_end_samples, sliced_w2
from dpmsolver.solvers import configurations

SD = dp.DiscreteVPSchedule()
MIX = SDE_MIXTURE
STOCHASTIC = [(name, dict(cfg)) for name, cfg, s in configurations() if s.stochastic]


def run(name: str, cfg: dict, *, scale: float = 1.0) -> torch.Tensor:
    cfg = dict(cfg)
    return sde_end_samples(dp.get_solver(name, cfg.pop("order"), **cfg), noise_scale=scale)


def target(seed: int) -> torch.Tensor:
    return marginal_samples(seed, SD.knot(0.0))


@pytest.fixture(scope="module")
def floor() -> float:
    """Distance between two independent exact sample sets: the test's resolution."""
    return sliced_w2(target(1), target(2))


@pytest.mark.parametrize(("name", "cfg"), STOCHASTIC, ids=[f"{n}-{c}" for n, c in STOCHASTIC])
def test_sde_samples_match_the_data_distribution(name: str, cfg: dict, floor: float) -> None:
    d = sliced_w2(run(name, cfg), target(3))
    assert d < 1.8 * floor, (d, floor)


@pytest.mark.parametrize("scale", [0.6, 1.5])
def test_distribution_test_can_fail(floor: float, scale: float) -> None:
    """Negative control: injecting 40% too little or 50% too much noise is detected."""
    d = sliced_w2(run("dpmpp_2m_sde", {"order": 2}, scale=scale), target(3))
    assert d > 1.8 * floor, (d, floor)


@pytest.mark.parametrize(
    ("sde", "ode"),
    [
        (("dpmpp_multistep_sde", {"order": 2}), ("dpmpp_multistep", {"order": 2})),
        (("dpmpp_multistep_sde", {"order": 3}), ("dpmpp_multistep", {"order": 3})),
        (
            ("dpmpp_multistep_sde", {"order": 2, "variant": "heun"}),
            ("dpmpp_multistep", {"order": 2, "variant": "heun"}),
        ),
        (("dpmpp_2s_sde", {"order": 2}), ("dpmpp_singlestep", {"order": 2})),
        (("euler_ancestral", {"order": 1}), ("ddim", {"order": 1})),
        (("dpmpp_2s_ancestral", {"order": 2}), ("dpmpp_singlestep", {"order": 2})),
    ],
)
def test_zero_noise_is_the_ode_solver(sde: tuple[str, dict], ode: tuple[str, dict]) -> None:
    net = dp.MixtureNetwork(MIX, SD)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (sn, sc), (on, oc) = sde, ode
    sc, oc = dict(sc), dict(oc)
    a = dp.sample(
        net,
        z,
        schedule=SD,
        steps=12,
        solver=dp.Recipe(sn, {**{**sc, "eta": 0.0}, "order": sc.pop("order")}),
    )
    b = dp.sample(
        net, z, schedule=SD, steps=12, solver=dp.Recipe(on, {**oc, "order": oc.pop("order")})
    )
    assert torch.equal(a.x, b.x)


@pytest.mark.parametrize(
    "name",
    ["dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_sde", "euler_ancestral", "dpmpp_2s_ancestral"],
)
def test_samples_do_not_depend_on_batch_composition(name: str) -> None:
    net = dp.MixtureNetwork(MIX, SD)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seeds = list(range(100, 108))
    whole = dp.sample(
        net,
        z,
        schedule=SD,
        solver=name,
        steps=10,
        options=dp.SampleOptions(noise_sampler=SeededNoise(seeds)),
    ).x
    parts = [
        dp.sample(
            net,
            z[i : i + 3],
            schedule=SD,
            solver=name,
            steps=10,
            options=dp.SampleOptions(noise_sampler=SeededNoise(seeds[i : i + 3])),
        ).x
        for i in (0, 3, 6)
    ]
    assert torch.equal(torch.cat(parts), whole)
    again = dp.sample(
        net,
        z,
        schedule=SD,
        solver=name,
        steps=10,
        options=dp.SampleOptions(noise_sampler=SeededNoise(seeds)),
    ).x
    assert torch.equal(again, whole)


def test_stochastic_solver_gets_default_noise_and_pure_noise_start() -> None:
    flow = dp.RectifiedFlowSchedule(t_max=1.0)
    net = dp.MixtureNetwork(MIX, flow, "flow")
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(0)
    a = dp.sample(
        net,
        z,
        schedule=flow,
        prediction="flow",
        solver="dpmpp_2m_sde",
        steps=8,
        grid="time_uniform",
    ).x
    torch.manual_seed(0)
    b = dp.sample(
        net,
        z,
        schedule=flow,
        prediction="flow",
        solver="dpmpp_2m_sde",
        steps=8,
        grid="time_uniform",
    ).x
    assert torch.equal(a, b) and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="eta must be >= 0"):
        dp.get_solver("dpmpp_2m_sde", eta=-1.0)
    assert not math.isnan(float(a.sum()))
