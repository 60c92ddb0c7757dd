"""solver="auto": every recipe is valid, spends exactly the budget, and samples finitely."""

from __future__ import annotations

import pytest
import torch

import dpmsolver as dp
from dpmsolver.auto import _TABLE, recommend


@pytest.mark.parametrize("key", sorted(_TABLE), ids=[f"w{w}-nfe{n}" for w, n in sorted(_TABLE)])
def test_every_recipe_spends_its_budget_on_the_exact_model(key: tuple[float, int]) -> None:
    w, nfe = key
    sched = dp.DiscreteVPSchedule()
    mix = dp.default_mixture(dim=4, num_classes=2)
    net = dp.MixtureNetwork(mix, sched)
    y = torch.tensor([0, 1, 1])
    r = dp.sample(
        net,
        torch.randn(3, 4, dtype=torch.float64),
        schedule=sched,
        solver="auto",
        nfe=nfe,
        cond={"y": y},
        uncond={"y": torch.full_like(y, 2)},
        guidance_scale=w,
    )
    assert r.nfe == nfe == net.calls and torch.isfinite(r.x).all()


@pytest.mark.parametrize("w", [0.0, 1.0, 2.0, 5.0, 9.0, 20.0])
def test_any_budget_gets_a_recipe_that_can_spend_it(w: float) -> None:
    sched = dp.DiscreteVPSchedule()
    for nfe in range(1, 61):
        plan = recommend(nfe, w).plan(sched, nfe=nfe)
        assert plan.nfe == nfe and plan.grid.steps == len(plan.steps)


def test_auto_uses_the_guidance_bucket_and_budget() -> None:
    assert recommend(10, 7.5) is _TABLE[(7.5, 10)]
    assert recommend(11, 8.0) is _TABLE[(7.5, 10)]  # nearest measured cell below
    assert recommend(100, 1.0) is _TABLE[(1.0, 50)]
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        recommend(10, float("nan"))
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        recommend(0, 1.0)
