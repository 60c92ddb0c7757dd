"""TuneOptions.tail_accept: stage (a) takes a finalist over the current choice by the mean
squared error estimated over the held-out and guard rows where the two end far apart on a
guard row (the tail check's estimate), and by the held-out half elsewhere."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

import dpmsolver as dp
from dpmsolver.tune import TuneOptions
from dpmsolver.tune.acceptance import _stage_a_takes, _tail_mse
from dpmsolver.tune.pilot import _Choice, _Problem

from .test_tune import CHEAP, COND, NET, SD, Z
from .test_tune_tail import CHOSEN, ROBUST, _choice, _guard
from .test_tune_tail import problem as problem

pytest.importorskip("scipy")

ON = TuneOptions(tail_accept=True)


def _pair(problem: _Problem, new_held: float, old_held: float) -> tuple[_Choice, _Choice]:
    n = len(problem.held)
    return _choice(CHOSEN, new_held, n), _choice(ROBUST, old_held, n)


def test_a_far_guard_sample_refuses_what_the_held_out_half_takes(problem: _Problem) -> None:
    new, old = _pair(problem, 0.01, 0.02)  # the held-out half takes new
    prob = dataclasses.replace(problem, guard=_guard(problem, {3: 5.0}, truth="robust"))
    assert _stage_a_takes(prob, new, old, TuneOptions())  # off: the held-out half decides
    assert not _stage_a_takes(prob, new, old, ON)


def test_a_far_guard_sample_takes_what_the_held_out_half_refuses(problem: _Problem) -> None:
    new, old = _pair(problem, 0.02, 0.01)  # the held-out half refuses new
    prob = dataclasses.replace(problem, guard=_guard(problem, {3: 5.0}, truth="chosen"))
    assert not _stage_a_takes(prob, new, old, TuneOptions())
    assert _stage_a_takes(prob, new, old, ON)
    # ... unless a held-out sample newly diverges under it
    new.held[0] = 2.0 * problem.spread + 1.0
    assert not _stage_a_takes(prob, new, old, ON)


def test_without_a_far_guard_sample_the_held_out_half_decides(problem: _Problem) -> None:
    prob = dataclasses.replace(problem, guard=_guard(problem, {}, truth="robust"))
    assert _stage_a_takes(prob, *_pair(problem, 0.01, 0.02), ON)
    assert not _stage_a_takes(prob, *_pair(problem, 0.02, 0.01), ON)
    assert prob.guard is not None and prob.guard.references == {}  # nothing solved
    # no guard, or no tail rows: the held-out half too
    far = dataclasses.replace(problem, guard=_guard(problem, {3: 5.0}, truth="robust"))
    assert _stage_a_takes(
        far, *_pair(problem, 0.01, 0.02), TuneOptions(tail_accept=True, tail_rows=0)
    )
    assert _stage_a_takes(dataclasses.replace(problem, guard=None), *_pair(problem, 0.01, 0.02), ON)


def test_tune_asks_the_tail_estimate_for_stage_a_only_when_on(
    patch_tune: Callable[[str, Any], None],
) -> None:
    real = _tail_mse
    asked: list[bool] = []

    def none_far(prob, guard, choices, opts, *args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(any(c.stage == "default" for c in choices))
        real(prob, guard, choices, opts, *args, **kwargs)
        return None  # as if no guard row were far: the held-out half decides

    patch_tune("_tail_mse", none_far)
    off = dp.tune(NET, Z, schedule=SD, nfe=[6], guidance_scale=3.0, **COND, **CHEAP)
    assert not any(asked)  # the tail ranking and check never hold the default recipe
    asked.clear()
    on = dp.tune(
        NET, Z, schedule=SD, nfe=[6], guidance_scale=3.0, **COND, **CHEAP, tail_accept=True
    )
    assert any(asked)
    # with no far row the held-out half decides, so the choice is the same
    (a,), (b,) = off.choices, on.choices
    assert dataclasses.replace(a, seconds=0.0, evaluations=0) == dataclasses.replace(
        b, seconds=0.0, evaluations=0
    )


def test_tail_accept_is_checked() -> None:
    with pytest.raises(ValueError, match="tail_accept"):
        TuneOptions(tail_accept="yes")  # type: ignore[arg-type]
    assert TuneOptions().tail_accept is False  # a study, off by default


CAPPED = TuneOptions(tail_accept=True, tail_accept_capped=True)


def test_the_capped_estimate_reads_the_guard_runs_under_the_cap(problem: _Problem) -> None:
    new, old = _pair(problem, 0.01, 0.02)  # the held-out half takes new
    g = _guard(problem, {3: 5.0}, truth="robust")  # uncapped: new blows up on row 3
    uncapped = g.samples
    # under the cap the two agree on every row, so the held-out half decides
    agree = _guard(problem, {}, truth="robust").samples
    g.samples = lambda prob, recipe, nfe, accept=False: (  # type: ignore[method-assign]
        agree if accept and g.accept_cap is not None else uncapped
    )(prob, recipe, nfe)
    prob = dataclasses.replace(problem, guard=g)
    assert not _stage_a_takes(prob, new, old, ON)  # the uncapped blow-up refuses it
    g.accept_cap = problem.norm_cap(3.0)  # as tune sets it with tail_accept_capped
    assert _stage_a_takes(prob, new, old, CAPPED)


def test_guard_runs_for_stage_a_take_the_accept_cap(problem: _Problem) -> None:
    assert problem.guard is not None
    g = dataclasses.replace(problem.guard, runs={}, references={})
    prob = dataclasses.replace(problem, guard=g)
    # no accept cap: stage (a) reads the very runs the guard's count reads
    assert g.samples(prob, ROBUST, 8, accept=True) is g.samples(prob, ROBUST, 8)
    # a cap far below the data's norms: the capped runs end near the origin
    g.accept_cap = tuple((lam, 1e-3) for lam, _ in problem.envelope)
    capped, free = g.samples(prob, ROBUST, 8, accept=True), g.samples(prob, ROBUST, 8)
    assert capped is not None and free is not None
    norms = capped.flatten(1).norm(dim=1), free.flatten(1).norm(dim=1)
    assert float(norms[0].max()) < 0.1 * float(norms[1].min())
    assert g.cap is None  # the guard's own runs keep theirs


def test_tune_gives_the_guard_the_profile_cap_only_when_on(
    patch_tune: Callable[[str, Any], None],
) -> None:
    real = _tail_mse
    seen: list[tuple[bool, bool]] = []

    def spy(prob, guard, choices, opts, *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(c.stage == "default" for c in choices):
            seen.append((kwargs.get("accept", False), guard.accept_cap is not None))
        return real(prob, guard, choices, opts, *args, **kwargs)

    patch_tune("_tail_mse", spy)
    kw = dict(schedule=SD, nfe=[6], guidance_scale=3.0, **COND, **CHEAP)
    dp.tune(NET, Z, **kw, tail_accept=True)
    assert seen and all(accept and not cap for accept, cap in seen)
    seen.clear()
    dp.tune(NET, Z, **kw, tail_accept=True, tail_accept_capped=True)
    assert seen and all(accept and cap for accept, cap in seen)


def test_tail_accept_capped_is_checked() -> None:
    with pytest.raises(ValueError, match="tail_accept_capped"):
        TuneOptions(tail_accept=True, tail_accept_capped="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tail_accept_capped=True needs tail_accept=True"):
        TuneOptions(tail_accept_capped=True)
    assert TuneOptions().tail_accept_capped is False
