"""The blow-up guard of dpmsolver.tune: noises of its own, run with no reference, count the
samples beyond a multiple of the pilot references' largest norm; a stage's choice with more
of them than an earlier stage's is refused for the latest stage with the fewest; the refusal
is stored in the profile (format 4; format 3 files still read)."""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.recipe import Recipe
from dpmsolver.tune import PROFILE_FORMAT, Profile, TuneOptions
from dpmsolver.tune.acceptance import _blowup_mse, _fallback, _guarded
from dpmsolver.tune.options import GUARD_REFERENCE_ROWS, GUARD_SEED
from dpmsolver.tune.pilot import _Choice, _Counter, _Guard, _pilot, _RowDenoiser

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
    chain = _chain("ddim", "unipc", "deis")
    best, why = _guarded(guard, None, chain, 8, TuneOptions(guard_rule="count"))  # type: ignore[arg-type]
    assert (best.recipe.solver, why) == (chosen, refused)
    if ran is not None:
        assert guard.ran == ran


@pytest.mark.parametrize(
    ("counts", "mse", "chosen", "refused"),
    [
        # the latest has the fewest: no estimate is made
        ({"ddim": 1, "unipc": 1, "deis": 0}, None, "deis", ()),
        # the count would take ddim; the estimate over the guard rows keeps deis
        ({"ddim": 0, "unipc": 3, "deis": 2}, [1.0, 4.0, 9.0], "deis", ()),
        ({"ddim": 0, "unipc": 3, "deis": 2}, [4.0, 1.0, 9.0], "unipc", ("steps",)),
        ({"ddim": 0, "unipc": 3, "deis": 2}, [4.0, 4.0, 1.0], "ddim", ("steps", "selection")),
        ({"ddim": 0, "unipc": 3, "deis": 2}, [2.0, 2.0, 3.0], "deis", ()),  # latest of equals
    ],
)
def test_the_mse_rule_weighs_the_far_samples_against_the_rest(
    patch_tune: Callable[[str, Any], None],
    counts: dict[str, int],
    mse: list[float] | None,
    chosen: str,
    refused: tuple[str, ...],
) -> None:
    seen: list[list[str]] = []

    def estimate(prob: object, guard: _Guard, choices: list[_Choice]) -> list[float]:
        seen.append([c.recipe.solver for c in choices])
        assert mse is not None
        return mse

    patch_tune("_blowup_mse", estimate)
    opts = TuneOptions(guard_rule="mse")
    best, why = _guarded(_Fake(counts), None, _chain("ddim", "unipc", "deis"), 8, opts)  # type: ignore[arg-type]
    assert (best.recipe.solver, why) == (chosen, refused)
    assert seen == ([] if mse is None else [["deis", "unipc", "ddim"]])  # latest first


class _Masks(_Guard):
    """A guard whose runs are given: each solver's rows beyond the bound."""

    def __init__(self, far: dict[str, set[int]], rows: int = 20) -> None:
        super().__init__(torch.zeros(1), list(range(rows)), 0.5)
        self.far = far

    def samples(self, prob, recipe, nfe, accept=False):  # type: ignore[no-untyped-def]
        rows = self.far.get(recipe.solver)
        if rows is None:
            return None
        return torch.tensor([[1.0 if i in rows else 0.0] for i in range(len(self.rows))])


@pytest.mark.parametrize(
    ("far", "z", "chosen", "refused"),
    [
        # nothing beyond, or the latest has the fewest: as the count
        ({"ddim": set(), "unipc": set(), "deis": set()}, 2.0, "deis", ()),
        ({"ddim": {0}, "unipc": {0}, "deis": set()}, 2.0, "deis", ()),
        # one more far sample than the default: 1 < 2 sqrt(1), chance
        ({"ddim": set(), "unipc": {3}}, 2.0, "unipc", ()),
        # four more: 4 >= 2 sqrt(4), refused
        ({"ddim": set(), "unipc": {0, 1, 2, 3}}, 2.0, "ddim", ("selection",)),
        # three more on top of the default's two: 3 < 2 sqrt(3)
        ({"ddim": {0, 1}, "unipc": {0, 1, 2, 3, 4}}, 2.0, "unipc", ()),
        # discordant rows count both ways: 6 - 4 < 2 sqrt(10)
        ({"ddim": {0, 1, 2, 3}, "unipc": set(range(4, 10))}, 2.0, "unipc", ()),
        # a smaller z refuses one sample more
        ({"ddim": set(), "unipc": {3}}, 0.5, "ddim", ("selection",)),
    ],
)
def test_the_paired_rule_refuses_only_an_excess_that_stands(
    far: dict[str, set[int]], z: float, chosen: str, refused: tuple[str, ...]
) -> None:
    guard = _Masks(far)
    chain = _chain(*far)
    opts = TuneOptions(guard_rule="paired", guard_z=z)
    best, why = _guarded(guard, None, chain, 8, opts)  # type: ignore[arg-type]
    assert (best.recipe.solver, why) == (chosen, refused)
    # the count refuses wherever the paired rule does, and more
    count, _ = _guarded(guard, None, chain, 8, TuneOptions(guard_rule="count"))  # type: ignore[arg-type]
    if best.recipe.solver != chain[-1].recipe.solver:
        assert count.recipe.solver == best.recipe.solver


def test_the_paired_rule_walks_back_to_the_latest_whose_excess_does_not_stand() -> None:
    # the count takes the default; deis's six more stand, unipc's one does not
    far = {"ddim": set(), "unipc": {7}, "deis": set(range(6))}
    best, why = _guarded(_Masks(far), None, _chain(*far), 8, TuneOptions(guard_rule="paired"))  # type: ignore[arg-type]
    assert (best.recipe.solver, why) == ("unipc", ("steps",))
    count, why = _guarded(_Masks(far), None, _chain(*far), 8, TuneOptions(guard_rule="count"))  # type: ignore[arg-type]
    assert (count.recipe.solver, why) == ("ddim", ("steps", "selection"))
    # a later choice that cannot run stays refused
    far = {"ddim": set(), "unipc": {7}}
    guard = _Masks(far)
    guard.far = {"ddim": set()}  # unipc's runs now fail; its count is then all rows + 1
    best, why = _guarded(guard, None, _chain("ddim", "unipc"), 8, TuneOptions(guard_rule="paired"))  # type: ignore[arg-type]
    assert (best.recipe.solver, why) == ("ddim", ("selection",))


@pytest.mark.parametrize(
    ("far", "mse", "chosen", "refused", "asked"),
    [
        # the excess is chance and costs nothing: kept, as the paired rule keeps it
        ({"ddim": set(), "unipc": {3}}, {"unipc": 1.0, "ddim": 2.0}, "unipc", (), 1),
        # the excess is chance but its far sample costs: refused
        ({"ddim": set(), "unipc": {3}}, {"unipc": 3.0, "ddim": 2.0}, "ddim", ("selection",), 1),
        # an excess that stands is refused without an estimate
        ({"ddim": set(), "unipc": {0, 1, 2, 3}}, {}, "ddim", ("selection",), 0),
        # the latest costs, the one before does not: walked back to it
        (
            {"ddim": set(), "unipc": {7}, "deis": {5}},
            {"deis": 3.0, "unipc": 1.5, "ddim": 2.0},
            "unipc",
            ("steps",),
            2,
        ),
    ],
)
def test_the_paired_mse_rule_also_weighs_an_excess_that_is_chance(
    patch_tune: Callable[[str, Any], None],
    far: dict[str, set[int]],
    mse: dict[str, float],
    chosen: str,
    refused: tuple[str, ...],
    asked: int,
) -> None:
    seen: list[list[str]] = []

    def estimate(prob: object, guard: _Guard, choices: list[_Choice]) -> list[float]:
        seen.append([c.recipe.solver for c in choices])
        return [mse[c.recipe.solver] for c in choices]

    patch_tune("_blowup_mse", estimate)
    opts = TuneOptions(guard_rule="paired_mse")
    best, why = _guarded(_Masks(far), None, _chain(*far), 8, opts)  # type: ignore[arg-type]
    assert (best.recipe.solver, why) == (chosen, refused)
    assert len(seen) == asked and all(pair[1] == "ddim" for pair in seen)  # against the fewest


def _held(solver: str, errors: list[float]) -> _Choice:
    return _Choice(Recipe(solver), "selection", 0.0, torch.tensor(errors, dtype=torch.float64), 8)


def test_the_fallback_takes_the_first_finalist_as_safe_as_the_default() -> None:
    prob = types.SimpleNamespace(spread=10.0, probes=None)
    default = _held("ddim", [1.0, 1.0, 1.0, 1.0])
    finalists = [
        _held("unipc", [0.1, 0.1, 0.1, 0.1]),  # better, but more far guard samples
        _held("deis", [2.0, 2.0, 2.0, 2.0]),  # as safe, but the held-out half refuses it
        _held("heun", [0.5, 0.5, 0.5, 0.5]),  # as safe and better: taken
        _held("dpmpp_3m", [0.2, 0.2, 0.2, 0.2]),  # better still, but ranked after
    ]
    guard = _Fake({"ddim": 1, "unipc": 3, "deis": 0, "heun": 1, "dpmpp_3m": 0})
    opts = TuneOptions(guard_fallback=True)
    got = _fallback(prob, guard, finalists, default, opts)  # type: ignore[arg-type]
    assert got is finalists[2]
    guard = _Fake({"ddim": 0, "unipc": 3, "deis": 0, "heun": 1, "dpmpp_3m": 1})
    assert _fallback(prob, guard, finalists, default, opts) is None  # type: ignore[arg-type]


def test_tune_falls_back_to_a_finalist_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, patch_tune: Callable[[str, Any], None]
) -> None:
    # the guard refuses every stage back to the (weak) default recipe; no guard sample is
    # beyond the bound, so with the fallback stage (a)'s first finalist that the held-out
    # half takes over the default is kept
    def refuse_all(guard: _Guard, prob: object, taken: list[_Choice], *_: object) -> object:
        return taken[0], tuple(c.stage for c in reversed(taken[1:]))

    patch_tune("_guarded", refuse_all)
    monkeypatch.setattr(_Guard, "blowups", lambda *a: 0)
    patch_tune("resolve", lambda *a: Recipe("ddim"))
    kw = dict(schedule=SD, guidance_scale=5.0, nfe=[10], guard_rule="count", **COND, **FAST)
    plain = dp.tune(NET, Z, **kw)  # type: ignore[arg-type]
    fell = dp.tune(NET, Z, guard_fallback=True, **kw)  # type: ignore[arg-type]
    (a,), (b,) = plain.choices, fell.choices
    assert a.stage == "default" and a.recipe.solver == "ddim" and a.guard_refused
    assert b.stage == "selection" and b.recipe.timesteps is None and b.recipe.solver != "ddim"
    assert b.guard_refused == a.guard_refused
    assert b.heldout_error < a.heldout_error


def _choice(problem, recipe: Recipe, nfe: int) -> _Choice:  # type: ignore[no-untyped-def]
    x = problem.run(recipe, nfe)
    cal = float((x[problem.cal] - problem.reference[problem.cal]).pow(2).mean().sqrt())
    return _Choice(recipe, "selection", cal, problem.errors(x, problem.held), nfe)


def test_blowup_mse_references_the_farthest_guard_rows(problem) -> None:  # type: ignore[no-untyped-def]
    # every guard sample beyond a tiny bound: the farthest GUARD_REFERENCE_ROWS get a
    # reference, the others count at each choice's held-out mean
    guard = dataclasses.replace(problem.guard, bound=1e-9, runs={}, references={})
    good, poor = _choice(problem, Recipe("dpmpp_3m"), 30), _choice(problem, Recipe("ddim"), 4)
    mse = _blowup_mse(problem, guard, [good, poor])
    assert mse is not None and mse[0] < mse[1]
    assert len(guard.references) == min(ROWS, GUARD_REFERENCE_ROWS) < ROWS
    rows = sorted(guard.references)
    ref = torch.stack([guard.references[i] for i in rows])
    for c, got in zip([good, poor], mse, strict=True):
        x = guard.samples(problem, c.recipe, c.nfe)
        tail = float((x[rows] - ref).flatten(1).pow(2).mean(1).sum())
        held = c.held.pow(2)
        want = (float(held.sum()) * (1 + (ROWS - len(rows)) / len(held)) + tail) / (
            len(held) + ROWS
        )
        assert got == pytest.approx(want, rel=1e-12)
    # within the bound: no reference, the estimate is the held-out mean
    calm = dataclasses.replace(problem.guard, bound=math.inf, runs={}, references={})
    assert _blowup_mse(problem, calm, [good]) == pytest.approx([float(good.held.pow(2).mean())])
    assert calm.references == {}


def test_the_guard_runs_with_its_cap(problem) -> None:  # type: ignore[no-untyped-def]
    free = dataclasses.replace(problem.guard, runs={})
    capped = dataclasses.replace(problem.guard, runs={}, cap=((0.0, 1e-3),))
    x = free.samples(problem, Recipe("dpmpp_3m"), 10)
    y = capped.samples(problem, Recipe("dpmpp_3m"), 10)
    assert x is not None and y is not None
    assert float(y.flatten(1).norm(dim=1).max()) <= 1e-3 * (1 + 1e-9)
    assert float(x.flatten(1).norm(dim=1).max()) > 0.1


def test_tune_caps_the_guard_runs_but_for_the_count(patch_tune: Callable[[str, Any], None]) -> None:
    caps: list[object] = []
    original = _guarded

    def spy(guard: _Guard, *args: object) -> object:
        caps.append(guard.cap)
        return original(guard, *args)  # type: ignore[arg-type]

    patch_tune("_guarded", spy)
    for rule in ("count", "capped", "mse", "paired", "paired_mse"):
        dp.tune(NET, Z, schedule=SD, guidance_scale=5.0, nfe=[6], guard_rule=rule, **COND, **FAST)
    assert caps[0] is None and caps[3] is None and caps[4] is None
    assert caps[1] == caps[2] and caps[1] is not None and len(caps[1]) > 0  # type: ignore[arg-type]


def test_tune_refuses_fitted_choices_that_blow_up(monkeypatch: pytest.MonkeyPatch) -> None:
    def blowups(self: _Guard, prob: object, recipe: Recipe, nfe: int) -> int:
        return 3 if recipe.timesteps is not None or recipe.model_shifts is not None else 0

    monkeypatch.setattr(_Guard, "blowups", blowups)
    fast = {**FAST, "shift_runs": 8}
    p = dp.tune(
        NET, Z, schedule=SD, guidance_scale=5.0, nfe=[6, 10], guard_rule="count", **COND, **fast
    )
    for c in p.choices:
        assert c.recipe.timesteps is None and c.recipe.model_shifts is None
        assert set(c.guard_refused) <= {"steps", "shifts"}
    assert any(c.guard_refused for c in p.choices)  # the fitted stages were taken, then refused
    off = dp.tune(
        NET, Z, schedule=SD, guidance_scale=5.0, nfe=[6, 10], guard_rows=0, **COND, **fast
    )
    assert all(not c.guard_refused for c in off.choices)
    assert any(
        c.recipe.timesteps is not None or c.recipe.model_shifts is not None for c in off.choices
    )
    # the same counts, weighed: no guard sample is beyond the bound, so the estimate is
    # the held-out error, on which every accepted stage improved (the tail check, which
    # would compare the final choice with stage (a)'s on the guard rows, off)
    weighed = dp.tune(
        NET,
        Z,
        schedule=SD,
        guidance_scale=5.0,
        nfe=[6, 10],
        guard_rule="mse",
        tail_rows=0,
        **COND,
        **fast,
    )
    assert all(not c.guard_refused for c in weighed.choices)
    assert [c.stage for c in weighed.choices] == [c.stage for c in off.choices]


def test_the_refusal_is_stored_and_format_3_files_read(tmp_path: Path) -> None:
    p = dp.tune(NET, Z, schedule=SD, guidance_scale=5.0, nfe=[6], **COND, **FAST)
    (c,) = p.choices
    q = dataclasses.replace(p, choices=(dataclasses.replace(c, guard_refused=("steps",)),))
    path = tmp_path / "p.json"
    q.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == PROFILE_FORMAT == "dpmsolver-profile/14"
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
    with pytest.raises(ValueError, match="guard_z"):
        dp.tune(NET, Z, schedule=SD, guard_z=0.0)
    with pytest.raises(ValueError, match=r"guard_rule.*count.*capped.*mse.*paired.*paired_mse"):
        dp.tune(NET, Z, schedule=SD, guard_rule="fewest")
    with pytest.raises(ValueError, match="guard_fallback"):
        dp.tune(NET, Z, schedule=SD, guard_fallback="yes")
