"""``tune(..., memo_mb=...)``: a network call that repeats one made before is answered from
memory. The profile is bit for bit the one tuned with every call reaching the network (a
wrong answer from memory would move the errors, and with them the choices), in fewer
calls; a bound too small to hold a call changes nothing; bad values are named."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import dpmsolver as dp

from .test_tune_micro_batch import COND, OPTS, SD, Recording, Z

pytest.importorskip("scipy")

# the micro-batch test's stages (every one runs, the guard of 64 rows, the tail ranking and
# the check included), with stage (f) too
MEMO_OPTS: dict[str, Any] = {**OPTS, "compensation_runs": 3}


def _tune(net: Recording, **extra: Any) -> dp.Profile:
    return dp.tune(
        net, Z, schedule=SD, guidance_scale=5.0, nfe=[5, 8], workers=1, **COND, **MEMO_OPTS, **extra
    )


def _strip(p: dp.Profile) -> list[dict[str, Any]]:
    skip = ("seconds", "evaluations")
    return [{k: v for k, v in vars(c).items() if k not in skip} for c in p.choices]


def test_repeated_calls_come_from_memory_and_the_profile_is_the_same() -> None:
    every, memo, tiny = Recording(), Recording(), Recording()
    a = _tune(every, memo_mb=0)
    b = _tune(memo)  # the default keeps 256 MiB per budget
    c = _tune(tiny, memo_mb=1)
    assert _strip(a) == _strip(b) == _strip(c)
    assert a.reference_error == b.reference_error
    # both halves of a guided call reach the network in one batch
    assert sum(every.rows) == 2 * a.evaluations
    assert sum(memo.rows) == 2 * b.evaluations
    assert b.evaluations < 0.95 * a.evaluations
    assert [x.evaluations for x in b.choices] != [x.evaluations for x in a.choices]


def test_an_answer_from_memory_is_not_changed_by_the_caller() -> None:
    """The solver may update what the network returned in place; the memory's copy stays."""
    from dpmsolver.schedules import Knot
    from dpmsolver.tune.pilot import _Counter

    calls = []

    def den(x: Tensor, knot: Knot, rows: list[int] | None = None) -> Tensor:
        calls.append(knot.t)
        return x * 2.0

    counter = _Counter(den, memo_mb=1)  # type: ignore[arg-type]
    knot = SD.knot(SD.t_max)
    x = torch.ones(3, 2, dtype=torch.float64)
    first = counter(x, knot)
    first.add_(5.0)
    x2 = x.clone()
    again = counter(x2, knot)
    assert torch.equal(again, 2.0 * x) and len(calls) == 1 and counter.rows == 3
    x2[0, 0] = 7.0  # other states at the same knot are evaluated
    counter(x2, knot)
    counter(x, SD.knot(0.5 * SD.t_max))  # and the same states at another knot
    assert len(calls) == 3 and counter.rows == 9


def test_bad_memo_bounds_are_named() -> None:
    with pytest.raises(ValueError, match="memo_mb"):
        _tune(Recording(), memo_mb=-1)
    with pytest.raises((TypeError, ValueError), match="memo_mb"):
        _tune(Recording(), memo_mb=1.5)
