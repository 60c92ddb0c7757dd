"""The miss-tails benchmark: each miss's squared error split into its worst samples and the
rest, the rest compared on the same samples for both runs."""

from __future__ import annotations

import math

import pytest
import torch

from dpmsolver.bench import miss_tails as mt
from dpmsolver.bench.peer_suite import peer_configs, run_peers
from dpmsolver.bench.rescore import _sq, rescore_seed, run_auto
from dpmsolver.bench.suite import MixtureProblem, _rms, get_problem
from dpmsolver.bench.tuned import TunedRow

pytest.importorskip("diffusers")


def test_split_tails_by_hand() -> None:
    ours = torch.tensor([100.0, 1.0, 1.0, 1.0, 4.0, 1.0], dtype=torch.float64)
    theirs = torch.tensor([2.0, 2.0, 9.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    share_o, share_t, trim_o, trim_t = mt.split_tails(ours, theirs, 1)
    assert share_o == pytest.approx(100 / 108)
    assert share_t == pytest.approx(9 / 19)
    # samples 0 (ours' worst) and 2 (theirs') left out of both
    assert trim_o == pytest.approx(math.sqrt(7 / 4))
    assert trim_t == pytest.approx(math.sqrt(8 / 4))


@pytest.mark.parametrize("k", [0, 3])
def test_split_tails_refuses_a_k_that_leaves_too_few(k: int) -> None:
    with pytest.raises(ValueError, match="k must be"):
        mt.split_tails(torch.ones(6), torch.ones(6), k)


def test_split_tails_refuses_unpaired_errors() -> None:
    with pytest.raises(ValueError, match="equal 1-D"):
        mt.split_tails(torch.ones(6), torch.ones(5), 1)


def _row(tuned: float, peer: float, share: float, nfe: int = 8) -> TunedRow:
    return TunedRow(
        "p", "held_out", "vp", 7.5, nfe, tuned, tuned, peer, "b", 8, 8, "selection", "r",
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, new_noises=512, new_tuned=tuned, new_best_peer=peer,
        new_best_label="b", new_share=share,
    )  # fmt: skip


def test_misses_are_the_cells_above_the_best_peer_on_new_noises() -> None:
    rows = [_row(2.0, 1.0, 0.01, 5), _row(2.0, 1.0, 0.3, 6), _row(1.0, 2.0, 0.9, 8)]
    assert [r.nfe for r in mt.misses(rows)] == [5, 6]
    assert [r.nfe for r in mt.misses(rows, max_share=0.05)] == [5]


def test_job_splits_the_profile_and_the_peer_on_the_new_noises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # no tune (the default recipe stands in for a profile): this checks the noises, the
    # reference and the split, not the tuner
    monkeypatch.setattr(mt, "tune_problem", lambda *a, **k: None)
    (t,) = mt._job("iso2-vplin", 3.0, ((6, "diffusers UniPC bh2", 0.5),), 64, 2)
    p = get_problem("iso2-vplin")
    assert isinstance(p, MixtureProblem)
    z = p.noise(64, seed=rescore_seed(p))
    y = p.labels(64)
    den = p.denoiser(3.0, y)
    ref = p.check_reference(den, p.x_T(z)).sample
    x, _ = run_auto(p, 3.0, z, None, 6)
    (config,) = [c for c in peer_configs(p.family) if c.label == "diffusers UniPC bh2"]
    peer = run_peers(p, 3.0, y, p.x_T(z), 6, configs=[config], denoiser=den)[0].sample
    assert x is not None and peer is not None
    expect = mt.split_tails(_sq(x, ref), _sq(peer, ref), 2)
    got = (t.tuned_share, t.peer_share, t.tuned_trimmed, t.peer_trimmed)
    assert got == pytest.approx(expect, rel=1e-12)
    assert t.tuned == pytest.approx(_rms(x, ref), rel=1e-12)
    assert t.peer == pytest.approx(_rms(peer, ref), rel=1e-12)
    assert not t.reproduced  # the record's 0.5 is not this run's error


def test_the_record_counts_misses_of_a_few_samples() -> None:
    a = mt.MissTail("p", 7.5, 8, 2.0, 2.0, 1.0, "b", 0.9, 0.1, 0.5, 1.0)
    b = mt.MissTail("p", 7.5, 10, 1.5, 1.5, 1.0, "b", 0.2, 0.1, 1.2, 1.0)
    text = mt.markdown([a, b], 5, "cmd", 0.1)
    assert "Reproduced the record's tuned error: 2 of 2 cells." in text
    assert "| 2 | 1 | 1 | 1 |" in text
    assert "| p | 7.5 | 8 | 2.000e+00 | 1.000e+00 | 2.00 | 0.90 | 0.10 |" in text
