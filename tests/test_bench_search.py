"""The auto search's stability filter measures the worst sample, and cannot be fooled by a
configuration that does not spend the budget."""

from __future__ import annotations

import math

import torch

from dpmsolver.bench.accuracy import DIVERGED, mixture_problem, recipe_sample, sample_errors
from dpmsolver.bench.search import worst_sample
from dpmsolver.recipe import Recipe


def test_worst_sample_is_the_largest_sample_error_over_all_problems() -> None:
    probs = [mixture_problem(15.0, batch=8, seed=sd) for sd in (0, 1)]
    recipe = Recipe("dpmpp_2m", {}, "logsnr")
    expected = max(
        float(sample_errors(recipe_sample(p, 6, recipe), p.reference).max()) for p in probs
    )  # type: ignore[arg-type]
    assert worst_sample(probs, recipe, 6) == expected > 0


def test_a_recipe_that_cannot_spend_the_budget_or_blows_up_is_unstable() -> None:
    probs = [mixture_problem(7.5, batch=4, seed=0)]
    assert (
        worst_sample(probs, Recipe("dpmpp_3s", {}, "logsnr"), 8) == math.inf
    )  # 8 is not a sum of 3s
    # dpmpp_3m without thresholding at guidance 15 and 6 NFE blows up (README thresholding table)
    p = mixture_problem(15.0, batch=16, seed=0)
    assert worst_sample([p], Recipe("dpmpp_3m", {}, "logsnr"), 6) > DIVERGED


def test_sample_errors_mark_non_finite_samples_infinite() -> None:
    a = torch.zeros(3, 4)
    a[1, 2] = math.nan
    e = sample_errors(a, torch.zeros(3, 4))
    assert e.tolist() == [0.0, math.inf, 0.0]
