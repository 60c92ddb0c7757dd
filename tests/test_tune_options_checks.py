"""Every scalar option of :class:`dpmsolver.TuneOptions` is checked when the options are
made: a bad value raises an error that names the option (and, for named values, the
accepted ones). A new option added without a check fails the coverage test here."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dpmsolver.tune.options import (
    _AT_LEAST_ONE,
    _CHOICES,
    _COUNTS,
    _FLAGS,
    _OPTIONAL_COUNTS,
    _OPTIONAL_POSITIVE,
    _POSITIVE,
    TuneOptions,
)

#: Checked one by one in TuneOptions.__post_init__; the others are structured values
#: that stage (a) reads (solvers, grids) or the sampling options, checked where built.
_SPECIAL = {"step_limit", "step_limit_margin", "envelope_margin", "v3_min_guidance", "accept_z"}
_STRUCTURED = {"solvers", "grids", "sample_options"}


def test_every_scalar_option_is_checked() -> None:
    tables = (_COUNTS, _OPTIONAL_COUNTS, _POSITIVE, _OPTIONAL_POSITIVE, _FLAGS, _CHOICES)
    checked = set().union(*map(set, tables)) | _SPECIAL
    fields = {f.name for f in dataclasses.fields(TuneOptions)}
    assert fields - _STRUCTURED == checked
    assert set(_AT_LEAST_ONE) <= set(_OPTIONAL_POSITIVE)


@pytest.mark.parametrize("name", sorted({**_COUNTS, **_OPTIONAL_COUNTS}))
def test_a_count_below_its_minimum_is_named(name: str) -> None:
    minimum = {**_COUNTS, **_OPTIONAL_COUNTS}[name]
    with pytest.raises(ValueError, match=name):
        TuneOptions(**{name: minimum - 1})
    TuneOptions(**{name: minimum + 8})  # 8 clears the larger minimum v3_points has


@pytest.mark.parametrize("name", sorted({*_POSITIVE, *_OPTIONAL_POSITIVE}))
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_a_factor_that_is_not_positive_and_finite_is_named(name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=name):
        TuneOptions(**{name: bad})


@pytest.mark.parametrize("name", _AT_LEAST_ONE)
def test_a_factor_below_one_is_named(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be >= 1 or None"):
        TuneOptions(**{name: 0.5})


@pytest.mark.parametrize("name", _FLAGS)
def test_a_flag_that_is_not_a_bool_is_named(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TuneOptions(**{name: "yes"})


@pytest.mark.parametrize("name", sorted(_CHOICES))
def test_an_unknown_named_value_is_named_with_the_accepted_ones(name: str) -> None:
    with pytest.raises(ValueError, match=name) as e:
        TuneOptions(**{name: "bogus"})
    assert all(v in str(e.value) for v in _CHOICES[name])
