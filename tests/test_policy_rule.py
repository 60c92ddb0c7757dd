"""The selection rule of ``solver="auto"`` (dpmsolver.bench.policy) on tiny synthetic tables:
it picks the minimax candidate, not the best on average, and leave-one-out scores each
problem with a policy fitted without it."""

from __future__ import annotations

import math

import pytest

from dpmsolver.bench.policy import (
    RULES,
    TIE_BAND,
    Granularity,
    Rule,
    choose_rule,
    fit,
    leave_one_out,
    loo_worsts,
    minimax,
    power_mean,
    rule_named,
)

# Two problems (a: discrete, b: flow), one guidance scale, two NFEs. "mean" is best on
# average and worst in one cell; "safe" is never far from the best peer; "partial" is the
# best everywhere it runs but cannot spend 6 NFE.
RATIOS = {
    ("a", 1.0, 5): {"mean": 0.1, "safe": 0.9, "partial": 0.5},
    ("a", 1.0, 6): {"mean": 0.2, "safe": 1.0},
    ("b", 1.0, 5): {"mean": 3.0, "safe": 1.1, "partial": 0.5},
    ("b", 1.0, 6): {"mean": 0.3, "safe": 1.2},
}
FAMILY = {"a": "discrete", "b": "flow"}
METHODS = ["mean", "safe", "partial"]


def test_minimax_picks_the_smallest_worst_ratio_not_the_best_mean() -> None:
    cells = sorted(RATIOS)
    name, worst, geo = minimax(RATIOS, cells, METHODS)  # type: ignore[misc]
    assert name == "safe" and worst == 1.2
    assert geo == pytest.approx(math.prod([0.9, 1.0, 1.1, 1.2]) ** 0.25)
    # "mean" has the smaller geometric mean but a worst cell of 3.0
    assert math.prod(RATIOS[c]["mean"] for c in cells) < math.prod(RATIOS[c]["safe"] for c in cells)


def test_minimax_skips_methods_that_cannot_run_a_cell_and_breaks_ties_by_the_mean() -> None:
    only5 = [("a", 1.0, 5), ("b", 1.0, 5)]
    assert minimax(RATIOS, only5, METHODS)[0] == "partial"  # type: ignore[index]
    assert minimax(RATIOS, sorted(RATIOS), ["partial"]) is None
    tie = {("a", 1.0, 5): {"x": 2.0, "y": 2.0}, ("b", 1.0, 5): {"x": 1.0, "y": 0.5}}
    assert minimax(tie, sorted(tie), ["x", "y"])[0] == "y"  # type: ignore[index]
    nan = {("a", 1.0, 5): {"x": math.nan, "y": 5.0}}
    assert minimax(nan, sorted(nan), ["x", "y"])[0] == "y"  # type: ignore[index]


def test_fit_per_key_and_per_family() -> None:
    one = Granularity("one", (("discrete", "flow"),), ((1.0,),), ((5,), (6,)))
    table = fit(RATIOS, FAMILY, ["a", "b"], one, METHODS)
    assert table == {
        ("discrete", 1.0, 5): "partial",
        ("flow", 1.0, 5): "partial",
        ("discrete", 1.0, 6): "mean",  # at 6 NFE alone "mean" is never worse than 0.3
        ("flow", 1.0, 6): "mean",
    }
    shared = Granularity("shared NFE", (("discrete", "flow"),), ((1.0,),), ((5, 6),))
    assert set(fit(RATIOS, FAMILY, ["a", "b"], shared, METHODS).values()) == {"safe"}
    per = Granularity("per family", (("discrete",), ("flow",)), ((1.0,),), ((5, 6),))
    table = fit(RATIOS, FAMILY, ["a", "b"], per, METHODS)
    assert table[("discrete", 1.0, 5)] == "mean" and table[("flow", 1.0, 6)] == "safe"


def test_leave_one_out_scores_each_problem_with_a_policy_that_never_saw_it() -> None:
    per = Granularity("per family", (("discrete",), ("flow",)), ((1.0,),), ((5, 6),))
    res = {r.problem: r for r in leave_one_out(RATIOS, FAMILY, ["a", "b"], per, METHODS)}
    # without a, the discrete row falls back to the choice made on b alone ("safe")
    assert res["a"].worst == 1.0 and res["a"].cell == ("a", 1.0, 6)
    # without b, the flow row is chosen on a alone: "mean", which fails b at 5 NFE
    assert res["b"].worst == 3.0 and res["b"].cell == ("b", 1.0, 5)


def test_power_mean_runs_from_the_worst_to_the_geometric_mean() -> None:
    vals = [1.0, 4.0, 16.0]
    assert power_mean(vals, math.inf) == 16.0
    assert power_mean(vals, 0.0) == pytest.approx(4.0)
    assert power_mean(vals, 1.0) == pytest.approx(7.0)
    assert power_mean(vals, 2.0) == pytest.approx(math.sqrt((1 + 16 + 256) / 3))
    # no overflow where ratios are astronomically large
    assert power_mean([1e300, 1e300], 16.0) == pytest.approx(1e300)
    assert power_mean([1.0, math.inf], 2.0) == math.inf


def test_a_power_mean_prefers_the_recipe_that_is_close_to_the_worst_everywhere() -> None:
    # "edge" wins the worst ratio by 5% and loses badly everywhere else
    cells = [("a", 1.0, n) for n in (5, 6, 8, 10)]
    ratios = {
        c: {"edge": 10.0 if c[2] == 5 else 8.0, "steady": 10.5 if c[2] == 5 else 1.0} for c in cells
    }
    assert minimax(ratios, cells, ["edge", "steady"])[0] == "edge"  # type: ignore[index]
    assert minimax(ratios, cells, ["edge", "steady"], 2.0)[0] == "steady"  # type: ignore[index]


def test_choose_rule_scores_every_objective_by_leave_one_out() -> None:
    # Three problems; on each, one method has a single bad cell. The worst-ratio objective
    # fitted on two problems picks the method that fails the third; the quadratic mean
    # does not.
    ratios = {
        ("a", 1.0, 5): {"x": 2.0, "y": 2.1},
        ("a", 1.0, 6): {"x": 2.0, "y": 1.0},
        ("b", 1.0, 5): {"x": 2.0, "y": 2.1},
        ("b", 1.0, 6): {"x": 2.0, "y": 1.0},
        ("c", 1.0, 5): {"x": 30.0, "y": 1.0},
        ("c", 1.0, 6): {"x": 1.0, "y": 1.0},
    }
    family = {"a": "discrete", "b": "discrete", "c": "discrete"}
    one = Granularity("one", (("discrete",),), ((1.0,),), ((5, 6),))
    rules = [Rule(one, math.inf), Rule(one, 2.0)]
    rule, loo = choose_rule(ratios, family, ["a", "b", "c"], ["x", "y"], rules)
    assert rule.power == 2.0 and rule.name == "one, power mean 2"
    assert max(r.worst for r in loo["one, worst ratio"]) == 30.0
    assert max(r.worst for r in loo["one, power mean 2"]) == 2.1
    assert rule_named(RULES[0].name) == RULES[0]
    with pytest.raises(ValueError, match="rule"):
        rule_named("no such rule")


def test_leave_one_out_worsts_within_the_tie_band_are_decided_by_their_geometric_mean() -> None:
    # "x" is 10 in one cell of every problem; "y" is 10.5 in one cell of a and b and 1
    # everywhere else. The worst-ratio rule keeps x (left-out worst 10); the quadratic
    # mean keeps y (left-out worst 10.5, but worsts of 10.5, 10.5 and 1).
    ratios = {}
    for p, y_worst in (("a", 10.5), ("b", 10.5), ("c", 1.0)):
        ratios[(p, 1.0, 5)] = {"x": 10.0, "y": y_worst}
        ratios[(p, 1.0, 6)] = {"x": 10.0, "y": 1.0}
    family = {p: "discrete" for p in "abc"}
    one = Granularity("one", (("discrete",),), ((1.0,),), ((5, 6),))
    rules = [Rule(one, math.inf), Rule(one, 2.0)]
    strict, loo = choose_rule(ratios, family, list("abc"), ["x", "y"], rules, band=1.0)
    assert strict.power == math.inf
    assert loo_worsts(loo["one, worst ratio"]) == (10.0, pytest.approx(10.0))
    assert loo_worsts(loo["one, power mean 2"]) == (10.5, pytest.approx(10.5 ** (2 / 3)))
    banded, _ = choose_rule(ratios, family, list("abc"), ["x", "y"], rules)
    assert TIE_BAND >= 1.05 and banded.power == 2.0
    with pytest.raises(ValueError, match="band"):
        choose_rule(ratios, family, list("abc"), ["x", "y"], rules, band=0.5)


@pytest.mark.parametrize("power", [math.inf, 16.0, 2.0, 1.0, 0.0])
def test_fit_ranking_every_method_at_once_picks_what_minimax_alone_picks(power: float) -> None:
    """``fit`` shortlists with numpy and lets ``minimax`` decide; on a table full of exact
    duplicates (a step limit that never fired), near ties, blow-ups, NaNs and budgets a
    method cannot spend, every key's pick is what ``minimax`` over all methods picks."""
    import random

    from dpmsolver.bench.policy import GUIDANCE, NFES

    rng = random.Random(7)
    problems = [f"p{i}" for i in range(6)]
    family = {p: ("discrete", "vp", "ve", "flow")[i % 4] for i, p in enumerate(problems)}
    methods = [f"m{i}" for i in range(12)]
    ratios: dict[tuple[str, float, int], dict[str, float]] = {}
    for p in problems:
        for w in GUIDANCE:
            for n in NFES:
                row = {m: math.exp(rng.gauss(0.0, 1.5)) for m in methods}
                row["m1"] = row["m0"]  # bit for bit the same recipe
                row["m3"] = row["m2"] * (1 + 1e-15)  # a near tie
                if rng.random() < 0.05:
                    row["m4"] = math.inf
                if rng.random() < 0.05:
                    row["m5"] = math.nan
                if n == 6:
                    del row["m6"]  # cannot spend an even budget
                ratios[(p, w, n)] = row
    for granularity in {r.granularity for r in RULES}:
        table = fit(ratios, family, problems, granularity, methods, power)
        for fams, ws, ns in granularity.keys():
            mine = [p for p in problems if family[p] in fams] or problems
            cells = [(p, w, n) for p in mine for w in ws for n in ns]
            best = minimax(ratios, cells, methods, power)
            assert best is not None and table[(fams[0], ws[0], ns[0])] == best[0]
