"""TuneOptions.tail_accept: stage (a) takes a finalist over the current choice by the mean
squared error estimated over the held-out and guard rows where the two end far apart on a
guard row (the tail check's estimate), and by the held-out half elsewhere."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

import dpmsolver as dp
from dpmsolver.tune import TuneOptions, _Choice, _Problem, _stage_a_takes

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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tune_mod = importlib.import_module("dpmsolver.tune")
    real = tune_mod._tail_mse
    asked: list[bool] = []

    def none_far(prob, guard, choices, opts, *args):  # type: ignore[no-untyped-def]
        asked.append(any(c.stage == "default" for c in choices))
        real(prob, guard, choices, opts, *args)
        return None  # as if no guard row were far: the held-out half decides

    monkeypatch.setattr(tune_mod, "_tail_mse", none_far)
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
