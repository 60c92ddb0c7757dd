"""The calibrated-peer benchmark: the peer pick is the configuration with the smallest
pilot error, scored on new noises; the record counts cells against it and the oracle."""

from __future__ import annotations

import math

import pytest

from dpmsolver.bench.calibrated_peer import PeerPick, calibrate_peers, markdown
from dpmsolver.bench.peer_suite import run_peers
from dpmsolver.bench.suite import MixtureProblem, _rms, get_problem
from dpmsolver.bench.tuned import PILOT, pilot_seed

pytest.importorskip("diffusers")


def test_the_pick_is_the_smallest_pilot_error_and_is_scored_on_new_noises() -> None:
    p = get_problem("iso2-vplin")
    assert isinstance(p, MixtureProblem)
    ((nfe, label, pilot_err, new_err),) = calibrate_peers(p, 3.0, (6,), 64)
    y = p.labels(PILOT)
    den = p.denoiser(3.0, y)
    x_T = p.x_T(p.noise(PILOT, seed=pilot_seed(p)))
    ref = p.check_reference(den, x_T).sample
    errors = {
        r.label: _rms(r.sample, ref)
        for r in run_peers(p, 3.0, y, x_T, 6, denoiser=den)
        if r.sample is not None
    }
    assert nfe == 6 and len(errors) > 20
    assert errors[label] == pytest.approx(pilot_err, rel=1e-12)
    assert pilot_err == min(v for v in errors.values() if math.isfinite(v))
    assert math.isfinite(new_err) and new_err != pilot_err


def test_the_record_counts_cells_against_both_peers() -> None:
    def pick(w: float, nfe: int, tuned: float, cal: float, oracle: float) -> PeerPick:
        return PeerPick("p", "vp", w, nfe, "a", 0.0, cal, tuned, oracle, "b")

    picks = [pick(7.5, 5, 1.0, 4.0, 1.5), pick(7.5, 20, 2.0, 1.0, 1.0), pick(1.0, 8, 1.0, 1.0, 3.0)]
    text = markdown(picks, "cmd", 0.1)
    assert "| tuned <= calibrated peer (every cell) | 3 | 2 | 1 |" in text
    assert "| tuned <= 0.5x calibrated peer (guidance 7.5, NFE 5-10) | 1 | 1 | 0 |" in text
    assert "| tuned <= oracle (every cell) | 3 | 2 | 1 |" in text
    assert "| tuned <= 0.5x oracle (guidance 7.5, NFE 5-10) | 1 | 0 | 1 |" in text
    assert "| p | 7.5 | 20 | 2.000e+00 | 1.000e+00 | 2.00 |" in text
