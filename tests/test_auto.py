"""solver="auto": on every schedule family every budget gets a recipe that spends it exactly
and samples finitely, and the choice is a deterministic function of (budget, guidance,
schedule family)."""

from __future__ import annotations

import itertools

import pytest
import torch

import dpmsolver as dp
from dpmsolver.auto import _ROWS, _TABLE, recommend, schedule_family
from dpmsolver.bench.suite import make_schedule_named

SCHEDULES = {
    "discrete": "sd",
    "vp": "vp_linear",
    "vp-cosine": "vp_cosine",
    "ve": "edm",
    "flow": "flow",
    "flow-shift3": "flow_shift3",
}
# the prediction each family's networks usually make (eps out of pure noise is started one
# step later by sample(); x0 and flow start at pure noise, where singlestep plans differ)
PREDICTION = {"discrete": "eps", "vp": "eps", "ve": "x0", "flow": "flow"}


def _schedule(name: str) -> dp.NoiseSchedule:
    return make_schedule_named(SCHEDULES[name])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_measured_cell_samples_its_budget_on_the_exact_model(name: str) -> None:
    sched = _schedule(name)
    family = schedule_family(sched)
    mix = dp.default_mixture(dim=4, num_classes=2)
    net = dp.MixtureNetwork(mix, sched, PREDICTION[family])  # type: ignore[arg-type]
    y = torch.tensor([0, 1, 1])
    z = torch.randn(3, 4, dtype=torch.float64)
    for w, nfe in sorted({(w, n) for f, w, n in _TABLE if f == family}):
        net.calls = 0
        r = dp.sample(
            net,
            z,
            schedule=sched,
            prediction=PREDICTION[family],  # type: ignore[arg-type]
            solver="auto",
            nfe=nfe,
            cond={"y": y},
            uncond={"y": torch.full_like(y, 2)},
            guidance_scale=w,
        )
        assert r.nfe == nfe == net.calls, (w, nfe)
        assert torch.isfinite(r.x).all(), (w, nfe)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("w", [0.0, 2.0, 5.0, 20.0])  # below 1, and nearest 3, 7.5, 15
def test_any_budget_gets_a_recipe_that_spends_it_on_every_family(name: str, w: float) -> None:
    sched = _schedule(name)
    for nfe in [*range(1, 41), 50, 77, 100]:
        plan = recommend(nfe, w, sched).plan(sched, nfe=nfe)
        assert plan.nfe == nfe and plan.grid.steps == len(plan.steps), nfe


def test_the_policy_sees_the_schedule_and_is_deterministic() -> None:
    flow = dp.RectifiedFlowSchedule(3.0)
    for nfe, w in itertools.product((5, 8, 13, 25, 40), (1.0, 4.0, 7.5, 15.0)):
        assert recommend(nfe, w, flow) == recommend(nfe, w, flow)
        req = dp.recipe.PolicyRequest(nfe, w, flow)
        assert dp.recipe.POLICIES["auto"](req) == recommend(nfe, w, flow)
    # without a schedule: Stable Diffusion's discrete schedule
    assert recommend(10, 7.5) == recommend(10, 7.5, dp.DiscreteVPSchedule())


def test_the_table_covers_every_family_guidance_and_budget_once() -> None:
    keys = [(f, w, n) for row in _ROWS for f in row.families for w in row.guidance for n in row.nfe]
    assert len(keys) == len(set(keys)) == 4 * 4 * 8
    assert {f for f, _, _ in keys} == {"discrete", "vp", "ve", "flow"}


def test_auto_uses_the_nearest_guidance_and_the_largest_budget_below() -> None:
    sd = dp.DiscreteVPSchedule()
    assert recommend(10, 7.5, sd) is _TABLE[("discrete", 7.5, 10)]
    assert recommend(11, 8.0, sd) is _TABLE[("discrete", 7.5, 10)]
    assert recommend(100, 1.0, sd) is _TABLE[("discrete", 1.0, 25)]
    assert recommend(12, 0.5, sd) is _TABLE[("discrete", 1.0, 12)]
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        recommend(10, float("nan"))
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        recommend(0, 1.0)
