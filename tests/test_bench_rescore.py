"""Re-scoring a tuned profile on new noises (dpmsolver.bench.rescore): the shortlist of peer
configurations, a third noise seed, the same numbers as running each piece by hand, and the
tuned benchmark's CSV and report carrying the new columns (old files still read)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.bench.peer_suite import peer_configs, run_peers
from dpmsolver.bench.rescore import bootstrap_share, rescore, rescore_seed, run_auto, shortlist
from dpmsolver.bench.suite import BaselineRow, MixtureProblem, get_problem
from dpmsolver.bench.tuned import (
    CSV_FIELDS,
    TunedRow,
    _rows_of,
    comparison,
    markdown,
    pilot_seed,
    rows_csv,
    rows_from_tuned_csv,
    tune_problem,
)
from dpmsolver.bench.tuned import main as tuned_main


def _row(errors: dict[str, float]) -> BaselineRow:
    r = BaselineRow("p", "fresh", "vp", 7.5, 8, 1.0, 1.0, "a", 3, 0.0, 1.0)
    r.errors = errors
    return r


def test_shortlist_keeps_the_near_best_and_at_least_the_best_few() -> None:
    errs = {"a": 1.0, "b": 3.9, "c": 4.1, "d": 50.0, "e": math.inf, "f": 2.0}
    assert shortlist(_row(errs)) == ["a", "f", "b"]  # within 4x, best first
    assert shortlist(_row(errs), keep=1.0, least=2) == ["a", "f"]
    assert shortlist(_row(errs), keep=1.0, least=5) == ["a", "f", "b", "c", "d"]  # no inf
    assert shortlist(_row({})) == []
    with pytest.raises(ValueError, match="keep must be >= 1"):
        shortlist(_row(errs), keep=0.5)


def test_new_noises_are_neither_the_pilot_nor_the_test_set() -> None:
    p = get_problem("iso2-sd")
    assert isinstance(p, MixtureProblem)
    new = p.noise(8, seed=rescore_seed(p))
    for other in (p.noise(8), p.noise(8, seed=pilot_seed(p))):
        assert not torch.allclose(new, other)


def test_rescore_is_the_profile_and_the_shortlist_on_the_new_noises() -> None:
    p = get_problem("iso2-sd")
    assert isinstance(p, MixtureProblem)
    w, nfe, n = 7.5, 5, 12
    from .test_tune import CHEAP  # here: test_tune skips its module without scipy

    prof = tune_problem(p, w, pilot=16, nfes=(nfe,), **CHEAP)
    errs = {"diffusers DDIM trailing": 0.1, "k-diffusion euler karras": 0.2}
    errs |= {"diffusers DPM++2M": 0.3, "diffusers Euler": 9.0}
    base = _row(errs)
    base.problem, base.nfe = p.name, nfe
    (cell,) = rescore(p, w, prof, {(p.name, w, nfe): base}, n=n, nfes=(nfe,))

    z = p.noise(n, seed=rescore_seed(p))
    y = p.labels(n)
    den = p.denoiser(w, y)
    ref = p.reference(den, p.x_T(z))
    x, spent = run_auto(p, w, z, prof, nfe)
    assert x is not None and spent == nfe
    assert cell.tuned == pytest.approx(float((x - ref).pow(2).mean().sqrt()), rel=1e-6)
    chosen = [c for c in peer_configs(p.family) if c.label in shortlist(base)]
    assert cell.peers == len(chosen) == 3  # "diffusers Euler" is 30x the best
    by_hand = {
        r.label: float((r.sample - ref).pow(2).mean().sqrt())
        for r in run_peers(p, w, y, p.x_T(z), nfe, configs=chosen, denoiser=den)
        if r.sample is not None
    }
    assert cell.best_peer == pytest.approx(min(by_hand.values()), rel=1e-6)
    assert by_hand[cell.best_label] == pytest.approx(cell.best_peer, rel=1e-9)
    assert 0 < cell.reference_error < 1e-6
    peer_x = next(
        r.sample
        for r in run_peers(p, w, y, p.x_T(z), nfe, configs=chosen, denoiser=den)
        if r.label == cell.best_label
    )
    assert peer_x is not None
    sq = [(v - ref).pow(2).flatten(1).mean(1) for v in (x, peer_x)]
    assert cell.share == bootstrap_share(*sq)


def test_bootstrap_share_counts_resamples_where_ours_is_not_worse() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.rand(64, generator=g, dtype=torch.float64)
    assert bootstrap_share(a, a) == 1.0  # ties count for us
    assert bootstrap_share(a, a + 1) == 1.0 and bootstrap_share(a + 1, a) == 0.0
    # one sample 100x the rest decides the RMS error, and is left out by ~1/e of resamples
    tail = torch.ones(64, dtype=torch.float64)
    tail[0] = 100.0
    share = bootstrap_share(tail, torch.full((64,), 2.0, dtype=torch.float64), 2000)
    assert 0.3 < share < 0.45
    assert bootstrap_share(a, a) == bootstrap_share(a, a)  # a fixed seed
    with pytest.raises(ValueError, match="two equal 1-D tensors"):
        bootstrap_share(a, a[:3])


def _tuned_row(nfe: int, tuned: float, peer: float, **new: Any) -> TunedRow:
    return TunedRow(
        "iso2-sd", "held_out", "discrete", 7.5, nfe, tuned, 1.0, peer, "x", nfe, nfe,
        "steps", "ddim [time_uniform]", 0.1, 0.2, 1e-9, 0.1, 1e-9, 3.0, 100, **new,
    )  # fmt: skip


def _rescored_rows(first: float) -> list[TunedRow]:
    """Two re-scored cells: missed on the test set and met (new error ``first``) on the new
    noises, then the other way round."""
    return [
        _tuned_row(5, 2.0, 1.0, new_noises=512, new_tuned=first, new_best_peer=1.0,
                   new_best_label="y", new_peers=4, new_reference_error=1e-10, new_share=0.9),
        _tuned_row(6, 0.5, 1.0, new_noises=512, new_tuned=3.0, new_best_peer=1.0,
                   new_best_label="z", new_peers=3, new_reference_error=2e-10, new_share=0.01),
    ]  # fmt: skip


def test_csv_carries_the_new_columns_and_reads_old_files() -> None:
    rows = _rescored_rows(0.5)
    back = rows_from_tuned_csv(rows_csv(rows))
    assert back == rows and back[0].new_ratio == 0.5 and back[1].ratio == 0.5
    old = rows_csv(rows).splitlines()
    k = CSV_FIELDS.index("new_noises")
    cut = "\n".join(",".join(line.split(",")[:k]) for line in old)
    read = rows_from_tuned_csv(cut)
    assert read[0].new_noises == 0 and math.isnan(read[0].new_ratio)
    assert read == [dataclasses.replace(r, **_no_new()) for r in rows]


def _no_new() -> dict[str, Any]:
    return {
        "new_noises": 0,
        "new_tuned": math.nan,
        "new_best_peer": math.nan,
        "new_best_label": "-",
        "new_peers": 0,
        "new_reference_error": math.nan,
        "new_share": math.nan,
    }


def test_report_has_the_new_noise_section_only_when_rescored() -> None:
    rows = _rescored_rows(0.4)
    text = markdown(rows, None)
    assert "## The same profiles on 512 new noises" in text
    assert "| tuned <= best peer (every cell) | 2 | 1 | 1 | 1.10 | 3.00 |" in text
    assert "| tuned <= 0.5x best peer (guidance 7.5, NFE 5-10) | 2 | 1 | 1 | 1.10 | 3.00 |" in text
    assert "0 meet the best peer on both sets, 1 only on the test set, 1 only on the new" in text
    assert "1 of the 1 are clear misses (share under 0.05)" in text
    assert "| iso2-sd | 7.5 | 6 | 3.000e+00 | 1.000e+00 | 3.00 | 0.010 | 0.50 | z |" in text
    plain = markdown([dataclasses.replace(r, **_no_new()) for r in rows], None)
    assert "new noises" not in plain


def test_bad_rescore_arguments_are_named() -> None:
    p = get_problem("iso2-sd")
    assert isinstance(p, MixtureProblem)
    with pytest.raises(ValueError, match=r"n \(new noises\) must be >= 1"):
        rescore(p, 7.5, dp.Profile.__new__(dp.Profile), {}, n=0, nfes=(5,))
    with pytest.raises(ValueError, match="least >= 1"):
        shortlist(_row({"a": 1.0}), least=0)


def test_comparison_counts_met_and_changed_cells_on_both_sets(tmp_path: Any) -> None:
    base = _rescored_rows(0.5)  # test set: missed, met; new noises: met, missed
    new = [
        dataclasses.replace(base[0], tuned=0.9),  # now met on the test set
        dataclasses.replace(base[1], new_tuned=0.8),  # now met on the new noises
        _tuned_row(8, 1.0, 1.0),  # in the new run only
    ]
    text = comparison(base, new)
    assert "| test set | 2 | 1 | 2 | 1 | 1 | 0 | 2.000 | 0.900 |" in text
    assert "| new noises | 2 | 1 | 2 | 1 | 1 | 0 | 3.000 | 0.800 |" in text
    assert "2 cells in both runs (0 only in the base run, 1 only in the new one)" in text
    assert text.count("| iso2-sd | 7.5 |") == 2  # both changed cells are listed
    assert "| test set | 1 | 0 | 0 | 0 | - | 1 | 1 |" in text  # 2.0 -> 0.9: over 2x better
    # every cell at half: here both cells are also half-target cells (guidance 7.5, 5-6 NFE)
    assert "| test set | 1 | 0 | 0 | 0 | - | 1 | 1 | 1 | 1 |" in text
    # a cell at 20 NFE counts among every cell only; from 0.4x to 0.6x it leaves half
    far = _tuned_row(20, 0.4, 1.0)
    left = comparison([*base, far], [*new, dataclasses.replace(far, tuned=0.6)])
    assert "| 1 | 0 | 0 | 0 | 1.50x (iso2-sd, w=7.5, 20 NFE) | 1 | 1 | 2 | 1 |" in left
    # a cell 5x worse (0.5 -> 2.5 the best peer) is over 2x and 4x worse, and leaves half
    worse = comparison(base[1:], [dataclasses.replace(base[1], tuned=2.5)])
    assert "| test set | 0 | 1 | 0 | 1 | 5.00x (iso2-sd, w=7.5, 6 NFE) | 1 | 0 | 1 | 0 |" in worse
    # a rerun's noise (here 1e-5 of the ratio) is no change
    rerun = [dataclasses.replace(r, tuned=r.tuned * (1 + 1e-5)) for r in base]
    assert "| test set | 2 | 1 | 1 | 0 | 0 | 0 |" in comparison(base, rerun)
    # the command line joins comma-separated CSVs on either side
    paths = []
    for i, rows in enumerate((base, new[:1], new[1:2])):
        paths.append(tmp_path / f"r{i}.csv")
        paths[-1].write_text(rows_csv(rows))
    assert _rows_of(f"{paths[1]},{paths[2]}") == new[:2]
    # a cell of an earlier file replaces the same cell of a later one
    assert _rows_of(f"{paths[1]},{paths[0]}") == [new[0], base[1]]
    with pytest.raises(SystemExit):
        tuned_main(["--compare", str(paths[0])])


def test_a_flow_problem_tuned_as_a_velocity_network_samples_as_one() -> None:
    p = get_problem("iso8-flow")
    assert isinstance(p, MixtureProblem)
    from .test_tune import CHEAP

    prof = tune_problem(p, 3.0, pilot=16, nfes=(6,), prediction="flow", **CHEAP)
    assert prof.prediction == "flow"
    z = p.noise(8, seed=rescore_seed(p))
    x, spent = run_auto(p, 3.0, z, prof, 6)  # a data-prediction network would be refused
    assert x is not None and spent == 6
    ref = p.reference(p.denoiser(3.0, p.labels(8)), p.x_T(z))
    assert float((x - ref).pow(2).mean().sqrt()) < 0.5
