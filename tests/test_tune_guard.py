"""The blow-up guard of dpmsolver.tune: noises of its own, run with no reference, count the
samples beyond a multiple of the pilot references' largest norm; a stage's choice with more
of them than an earlier stage's is refused for the latest stage with the fewest; the refusal
is stored in the profile (format 4; format 3 files still read)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import dpmsolver as dp
from dpmsolver.recipe import Recipe
from dpmsolver.tune import (
    GUARD_SEED,
    PROFILE_FORMAT,
    Profile,
    _Choice,
    _Counter,
    _Guard,
    _guarded,
    _pilot,
    _RowDenoiser,
)

from .test_tune import COND, FAST, NET, SD, Y, Z

pytest.importorskip("scipy")

ROWS = 40


@pytest.fixture(scope="module")
def problem():  # type: ignore[no-untyped-def]
    den = _Counter(_RowDenoiser(NET, "eps", {"y": Y}, {"y": torch.full_like(Y, 3)}, 5.0, None))
    return _pilot(den, SD, Z, 1e-5, 4, 0, 0, guard=(ROWS, 2.0))


def test_the_guard_noises_are_seeded_and_take_the_pilots_conditioning(problem) -> None:  # type: ignore[no-untyped-def]
    g = problem.guard
    assert g is not None and g.x_T.shape == (ROWS, *Z.shape[1:])
    gen = torch.Generator().manual_seed(GUARD_SEED)
    z = torch.randn((ROWS, *Z.shape[1:]), generator=gen, dtype=torch.float64)
    start = SD.knot(SD.t_max).sigma
    torch.testing.assert_close(g.x_T, z * start)
    assert g.rows == [i % Z.shape[0] for i in range(ROWS)]
    largest = float(problem.reference.flatten(1).pow(2).mean(1).sqrt().max())
    assert g.bound == pytest.approx(2.0 * largest)


def test_blowups_count_samples_beyond_the_bound(problem) -> None:  # type: ignore[no-untyped-def]
    g = problem.guard
    accurate = Recipe("dpmpp_3m")
    assert g.blowups(problem, accurate, 30) == 0
    assert dataclasses.replace(g, bound=1e-9).blowups(problem, accurate, 30) == ROWS
    # a recipe that cannot spend the budget counts as worse than every sample blowing up
    assert g.blowups(problem, Recipe("heun"), 4) == ROWS + 1
    # the guard rows' samples are the pilot rows' conditioning applied to other noises
    x = problem.run_from(accurate, 30, g.x_T, lambda x, k: problem.denoiser(x, k, rows=g.rows))
    assert x is not None and torch.isfinite(x).all()


class _Fake(_Guard):
    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__(torch.zeros(1), [0], 1.0)
        self.counts, self.ran = counts, []

    def blowups(self, prob, recipe, nfe):  # type: ignore[no-untyped-def]
        self.ran.append(recipe.solver)
        return self.counts[recipe.solver]


def _chain(*solvers: str) -> list[_Choice]:
    stages = ["default", "selection", "steps", "shifts"]
    return [_Choice(Recipe(s), stages[i], 0.0, torch.zeros(1), 8) for i, s in enumerate(solvers)]


@pytest.mark.parametrize(
    ("counts", "chosen", "refused", "ran"),
    [
        ({"ddim": 0, "unipc": 0, "deis": 0}, "deis", (), ["deis"]),
        ({"ddim": 0, "unipc": 0, "deis": 2}, "unipc", ("steps",), ["deis", "unipc"]),
        ({"ddim": 0, "unipc": 3, "deis": 2}, "ddim", ("steps", "selection"), None),
        ({"ddim": 4, "unipc": 3, "deis": 2}, "deis", (), None),  # the fewest, if all blow up
        ({"ddim": 4, "unipc": 2, "deis": 2}, "deis", (), None),  # the latest of the fewest
        ({"ddim": 1, "unipc": 2, "deis": 3}, "ddim", ("steps", "selection"), None),
    ],
)
def test_the_latest_stage_with_the_fewest_blowups_is_taken(
    counts: dict[str, int], chosen: str, refused: tuple[str, ...], ran: list[str] | None
) -> None:
    guard = _Fake(counts)
    best, why = _guarded(guard, None, _chain("ddim", "unipc", "deis"), 8)  # type: ignore[arg-type]
    assert (best.recipe.solver, why) == (chosen, refused)
    if ran is not None:
        assert guard.ran == ran


def test_tune_refuses_fitted_choices_that_blow_up(monkeypatch: pytest.MonkeyPatch) -> None:
    def blowups(self: _Guard, prob: object, recipe: Recipe, nfe: int) -> int:
        return 3 if recipe.timesteps is not None or recipe.model_shifts is not None else 0

    monkeypatch.setattr(_Guard, "blowups", blowups)
    fast = {**FAST, "shift_runs": 8}
    p = dp.tune(NET, Z, schedule=SD, guidance_scale=5.0, nfe=[6, 10], **COND, **fast)
    for c in p.choices:
        assert c.times is None and c.model_shifts is None
        assert set(c.guard_refused) <= {"steps", "shifts"}
    assert any(c.guard_refused for c in p.choices)  # the fitted stages were taken, then refused
    off = dp.tune(
        NET, Z, schedule=SD, guidance_scale=5.0, nfe=[6, 10], guard_rows=0, **COND, **fast
    )
    assert all(not c.guard_refused for c in off.choices)
    assert any(c.times is not None or c.model_shifts is not None for c in off.choices)


def test_the_refusal_is_stored_and_format_3_files_read(tmp_path: Path) -> None:
    p = dp.tune(NET, Z, schedule=SD, guidance_scale=5.0, nfe=[6], **COND, **FAST)
    (c,) = p.choices
    q = dataclasses.replace(p, choices=(dataclasses.replace(c, guard_refused=("steps",)),))
    path = tmp_path / "p.json"
    q.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == PROFILE_FORMAT == "dpmsolver-profile/10"
    assert Profile.load(path) == q
    data["format"] = "dpmsolver-profile/3"
    for ch in data["choices"]:
        del ch["guard_refused"], ch["x0_norm_cap"], ch["compensation"]
    path.write_text(json.dumps(data))
    assert Profile.load(path).choices[0].guard_refused == ()


def test_guard_options_are_checked() -> None:
    with pytest.raises(ValueError, match="guard_rows"):
        dp.tune(NET, Z, schedule=SD, guard_rows=-1)
    with pytest.raises(ValueError, match="guard_factor must be > 1"):
        dp.tune(NET, Z, schedule=SD, guard_factor=1.0)
    with pytest.raises(ValueError, match="guard_factor"):
        dp.tune(NET, Z, schedule=SD, guard_factor=math.nan)
