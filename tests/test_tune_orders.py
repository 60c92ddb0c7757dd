"""Stage (h), the order of each step (USF's per-step strategy for the order alone): a
recipe's ``orders`` replace the plan's and are checked against it, the greedy pass finds
the orders its objective prefers, ``tune`` keeps them only where the held-out half takes
them, and the profile, ``sample`` and the diffusers scheduler run them as tuned while the
k-diffusion sigmas warn that they cannot."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.bench.tuned import _describe
from dpmsolver.recipe import Recipe
from dpmsolver.tune import TuneOptions

from .test_compensation import (
    ARGS,
    kept_where_held_out_takes_it,
    late_stage_profile,
    sample_and_scheduler_agree,
)
from .test_tune import CHEAP, NET, SD, Z

TUNE = importlib.import_module("dpmsolver.tune.stages")  # the per-step stages and what they call

pytest.importorskip("scipy")


def test_orders_replace_the_plan_and_all_first_order_is_ddim() -> None:
    r = Recipe("dpmpp_multistep", {"order": 3}, grid="logsnr")
    planned = r.plan(SD, nfe=8).orders
    assert planned == [1, 2, 3, 3, 3, 3, 2, 1]
    lowered = dataclasses.replace(r, orders=(1, 2, 2, 3, 1, 3, 2, 1))
    assert lowered.plan(SD, nfe=8).orders == [1, 2, 2, 3, 1, 3, 2, 1]
    assert lowered.plan(SD, nfe=8).nfe == 8  # a multistep step costs one evaluation
    # every step at first order is DDIM on the same knots
    first = dataclasses.replace(r, orders=(1,) * 8)
    args: dict[str, Any] = dict(schedule=SD, prediction="eps", nfe=8)
    a = dp.sample(NET, Z[:4], solver=first, **args).x
    b = dp.sample(NET, Z[:4], solver=Recipe("ddim", grid="logsnr"), **args).x
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert float((dp.sample(NET, Z[:4], solver=r, **args).x - a).abs().max()) > 1e-4
    assert "orders=12231321" in lowered.describe()


def test_bad_orders_are_refused_by_name() -> None:
    r = Recipe("dpmpp_multistep", {"order": 2}, grid="logsnr")
    for bad, match in (
        ((1, 2, 2), r"orders has 3 entries but the recipe plans 5 steps"),
        ((1, 2, 3, 2, 1), r"orders\[2\]=3 exceeds the planned order 2"),
    ):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(r, orders=bad).plan(SD, nfe=5)
    for bad in ((1, 0, 1), (1, 2.5), "12"):
        with pytest.raises((ValueError, TypeError), match="orders"):
            dataclasses.replace(r, orders=bad)  # type: ignore[arg-type]
    for opt in ({"order_search": "yes"}, {"order_rows": 0}, {"order_max_nfe": 0}):
        with pytest.raises(ValueError, match=next(iter(opt))):
            TuneOptions(**opt)  # type: ignore[arg-type]


def greedy_pass(
    monkeypatch: pytest.MonkeyPatch, stage: str, base: Recipe, nfe: int, key: Any, cost: Any
) -> Any:
    """The per-step stage ``stage`` (``"_reorder"``, ``"_uncorrect"``) on ``base`` with
    ``cost(key(recipe, nfe))`` as the error on the rows: its choice and every key it ran."""
    runs: list[Any] = []

    def error(prob: Any, recipe: Recipe, n: int, rows: Sequence[int]) -> float:
        runs.append(key(recipe, n))
        return float(cost(runs[-1]))

    monkeypatch.setattr(TUNE, "_capped_error", error)
    monkeypatch.setattr(TUNE, "_choice", lambda prob, recipe, n, stage: (recipe, stage))
    prob = SimpleNamespace(plan=lambda recipe, n: recipe.plan(SD, nfe=n))
    return getattr(TUNE, stage)(prob, base, nfe, [0, 1]), runs


def _greedy(monkeypatch: pytest.MonkeyPatch, base: Recipe, nfe: int, cost: Any) -> Any:
    """``_reorder`` on ``base`` with ``cost(orders)`` as the error on the rows."""

    def orders(recipe: Recipe, n: int) -> tuple[int, ...]:
        return tuple(recipe.plan(SD, nfe=n).orders)

    return greedy_pass(monkeypatch, "_reorder", base, nfe, orders, cost)


def test_the_greedy_pass_lowers_each_step_to_its_best_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = Recipe("unipc", {"order": 3}, grid="logsnr")
    planned = base.plan(SD, nfe=8).orders
    target = [1, 2, 1, 3, 2, 3, 1, 1]  # each at most the planned order
    assert all(t <= p for t, p in zip(target, planned, strict=True))

    def cost(orders: Sequence[int]) -> float:
        return sum((o - t) ** 2 for o, t in zip(orders, target, strict=True))

    found, runs = _greedy(monkeypatch, base, 8, cost)
    recipe, stage = found
    assert stage == "orders" and recipe.orders == tuple(target)
    # the start, then every lower order of every step: no step planned at 1 is tried
    assert len(runs) == 1 + sum(p - 1 for p in planned)
    assert all(all(o <= p for o, p in zip(r, planned, strict=True)) for r in runs)
    # nothing better than the plan: no choice
    assert _greedy(monkeypatch, base, 8, lambda orders: 1.0)[0] is None
    # DDIM and singlestep solvers have no free order to choose
    assert _greedy(monkeypatch, Recipe("ddim"), 8, cost)[0] is None
    assert _greedy(monkeypatch, Recipe("dpmpp_singlestep", {"order": 2}), 9, cost)[0] is None


def test_stage_h_is_kept_only_where_the_held_out_half_takes_it() -> None:
    high = dict(
        CHEAP,
        solvers=(("dpmpp_multistep", {"order": 3}),),
        grids=(("logsnr", None),),
        shift_runs=0,
        compensation_runs=0,
        correction_components=0,
        guard_rows=0,  # the held-out half alone decides (the guard has tests of its own)
    )
    args = {**ARGS, "guidance_scale": 7.5, "nfe": [5, 6, 8, 10]}
    on = dp.tune(NET, Z, **args, **{**high, "order_search": True})
    off = dp.tune(NET, Z, **args, **high)
    for a in kept_where_held_out_takes_it(on, off, "orders"):
        assert a.recipe.orders is not None and len(a.recipe.orders) == a.nfe
        # the benchmark records say so, fitted knots or not
        assert f"orders={''.join(map(str, a.recipe.orders))}" in _describe(on, a.nfe, 7.5)[1]
    # only up to order_max_nfe
    low = dp.tune(NET, Z, **args, **{**high, "order_search": True, "order_max_nfe": 4})
    assert all(c.recipe.orders is None for c in low.choices)


def _ordered(orders: tuple[int, ...] | None) -> dp.Profile:
    return late_stage_profile(orders=orders)


def test_the_profile_samples_with_them_and_the_diffusers_scheduler_as_sample_does() -> None:
    planned = _ordered(None).choices[0].recipe.plan(SD, nfe=9).orders
    assert planned == [1, 2, 2, 2, 2, 2, 2, 2, 1]
    sample_and_scheduler_agree(_ordered(None), _ordered((1, 2, 1, 2, 1, 2, 2, 1, 1)))


def test_the_k_diffusion_sigmas_warn_and_older_profiles_read_without_them() -> None:
    ordered = _ordered((1, 2, 1, 2, 1, 2, 2, 1, 1))
    assert dp.Profile.from_json(ordered.to_json()) == ordered
    with pytest.warns(UserWarning, match="orders"):
        ordered.sigmas(9, 1.0, SD)
    data = _ordered(None).to_json()
    data["format"] = "dpmsolver-profile/10"
    for c in data["choices"]:
        del c["orders"]
    assert dp.Profile.from_json(data).choices[0].recipe.orders is None
