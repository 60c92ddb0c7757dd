"""``tune(..., micro_batch=m)``: no network call during tuning holds more than m samples
(2m rows under classifier-free guidance), and the profile is the one tuned in whole
batches (the mixture network is row-wise, so the rows beside a row in a call do not move
its output)."""

from __future__ import annotations

from typing import Any

import pytest
from torch import Tensor

import dpmsolver as dp

from .test_tune import COND, MIX, SD, Z

pytest.importorskip("scipy")

# every stage runs, the guard (64 rows here) and the tail ranking included
OPTS: dict[str, Any] = {
    "fine_knots": 8,
    "refine_runs": 2,
    "screen_rows": 2,
    "fine_rows": 2,
    "finalists": 2,
    "step_bases": 1,
    "shift_runs": 2,
    "guard_rows": 64,
}


class Recording:
    """The mixture network, recording the rows of every call."""

    def __init__(self) -> None:
        self.net = dp.MixtureNetwork(MIX, SD, "eps")
        self.rows: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        self.rows.append(x.shape[0])
        return self.net(x, t, **kwargs)


def _tune(net: Recording, **extra: Any) -> dp.Profile:
    return dp.tune(
        net, Z, schedule=SD, guidance_scale=5.0, nfe=[5, 8], workers=1, **COND, **OPTS, **extra
    )


def test_no_call_holds_more_than_the_micro_batch_and_the_profile_is_the_same() -> None:
    whole, split = Recording(), Recording()
    a = _tune(whole)
    b = _tune(split, micro_batch=5)
    # without it the guard's 64 samples (128 rows under guidance) go in one call
    assert max(whole.rows) == 2 * 64
    assert max(split.rows) <= 2 * 5
    assert sum(split.rows) == sum(whole.rows)
    assert a.evaluations == b.evaluations
    for ca, cb in zip(a.choices, b.choices, strict=True):
        assert (ca.nfe, ca.recipe.solver, ca.stage, ca.recipe.timesteps) == (
            cb.nfe,
            cb.recipe.solver,
            cb.stage,
            cb.recipe.timesteps,
        )
        assert cb.heldout_error == pytest.approx(ca.heldout_error, rel=1e-9)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_a_bad_micro_batch_is_refused_by_name(bad: Any) -> None:
    with pytest.raises((ValueError, TypeError), match="micro_batch"):
        dp.tune(Recording(), Z, schedule=SD, nfe=[5], micro_batch=bad)
