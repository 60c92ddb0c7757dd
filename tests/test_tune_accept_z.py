"""``TuneOptions.accept_z``: the held-out half keeps a stage's choice only where its gain
in mean squared error clears ``z`` standard errors of the paired differences
(:func:`dpmsolver.tune.clear_gain`); ``z = 0`` is the plain paired comparison."""

from __future__ import annotations

import math

import pytest
import torch

import dpmsolver as dp
from dpmsolver.recipe import Recipe
from dpmsolver.tune import TuneOptions, clear_gain
from dpmsolver.tune.acceptance import _accept
from dpmsolver.tune.pilot import _Choice

from .test_tune import CHEAP, COND, NET, SD, Z
from .test_tune_probes import problem  # noqa: F401  (the fixture)


def test_the_gain_must_clear_z_standard_errors() -> None:
    old = torch.tensor([1.0, 1.0, 1.0, 1.0])
    new = torch.tensor([0.0, 1.0, 1.0, 1.0])  # one sample better: d = (1, 0, 0, 0)
    d = old.pow(2) - new.pow(2)
    z_gain = float(d.mean()) / (float(d.std()) / math.sqrt(4))  # mean 0.25, se 0.25: z 1
    assert z_gain == pytest.approx(1.0)
    assert clear_gain(new, old, 0.99) and not clear_gain(new, old, 1.01)
    assert clear_gain(new, old, 0.0)  # no threshold: paired_better alone decides
    # every sample better by the same amount: no spread, any z
    assert clear_gain(torch.full((4,), 0.5), old, 100.0)
    # a worse or non-finite choice never clears a threshold
    assert not clear_gain(torch.full((4,), 2.0), old, 0.5)
    assert not clear_gain(torch.tensor([0.5, 0.5, math.inf, 0.5]), old, 0.5)
    assert not clear_gain(torch.tensor([0.5]), torch.tensor([1.0]), 0.5)  # one row: no se


def test_accept_applies_it(problem) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    old = _Choice(Recipe("ddim"), "default", 1.0, torch.full((12,), 0.2), 8, band=0.0)
    held = torch.full((12,), 0.2)
    held[:7] = 0.1  # 7 of 12 rows better: a lower RMS and median, with a spread
    new = _Choice(Recipe("ddim"), "x", 0.5, held, 8, band=0.0)
    d = old.held.pow(2) - held.pow(2)
    z = float(d.mean()) / (float(d.std()) / math.sqrt(12))
    assert _accept(new, old, problem, TuneOptions())
    assert _accept(new, old, problem, TuneOptions(accept_z=0.9 * z))
    assert not _accept(new, old, problem, TuneOptions(accept_z=1.1 * z))


def test_a_large_threshold_keeps_fewer_stages_and_bad_values_are_named() -> None:
    args = dict(schedule=SD, guidance_scale=5.0, nfe=[5, 8], tail_rows=0, **COND, **CHEAP)
    loose = dp.tune(NET, Z, **args)
    strict = dp.tune(NET, Z, **args, accept_z=50.0)
    rank = ("default", "selection", "steps", "shifts")
    assert [c.stage for c in loose.choices] != [c.stage for c in strict.choices]
    for a, b in zip(loose.choices, strict.choices, strict=True):
        assert rank.index(b.stage) <= rank.index(a.stage)
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="accept_z"):
            TuneOptions(accept_z=bad)
