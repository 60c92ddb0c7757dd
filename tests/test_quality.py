"""The sample-quality measures: Frechet distance, classifier scoring, optional Inception FID."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch

from dpmsolver.bench import quality


def test_frechet_distance_matches_the_formula_with_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(300, 5)) * 2 + 1
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(
        s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real
    )
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # a pure shift costs its squared length
    assert quality.frechet_distance(a, a + 3.0) == pytest.approx(9.0 * 5, rel=1e-8)


def test_frechet_distance_rejects_mismatched_features() -> None:
    with pytest.raises(ValueError, match="feature arrays"):
        quality.frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_shipped_classifier_recognises_held_out_digits() -> None:
    from dpmsolver.digits import load_classifier

    x, y = quality.real_digits()
    pred, feats = quality.classify(load_classifier(torch.device("cpu")), x, batch=100)
    assert (pred == y.numpy()).mean() >= 0.97
    assert feats.shape[0] == x.shape[0] and np.isfinite(feats).all()


def test_inception_fid_reports_why_it_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails
    assert quality.inception_fid_unavailable() == "torch-fidelity is not installed"
    with pytest.raises(RuntimeError, match="real FID unavailable: torch-fidelity is not installed"):
        quality.inception_fid(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert "Inception weights are not at" in str(quality.inception_fid_unavailable())


def test_inception_fid_hands_torch_fidelity_uint8_rgb_images(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def calculate_metrics(**kwargs: Any) -> dict[str, float]:
        seen.update(kwargs)
        return {"frechet_inception_distance": 12.5}

    fake = types.ModuleType("torch_fidelity")
    fake.calculate_metrics = calculate_metrics  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / quality.INCEPTION_WEIGHTS).write_bytes(b"")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert quality.inception_fid_unavailable() is None

    samples = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2).repeat(3, 1, 1, 1)
    assert quality.inception_fid(samples, -samples) == 12.5
    assert seen["fid"] is True and seen["cuda"] is False and seen["cache"] is False
    first = seen["input1"][0]
    assert len(seen["input1"]) == 3 and first.dtype == torch.uint8 and first.shape == (3, 2, 2)
    assert first[0].flatten().tolist() == [0, 128, 255, 255]  # [-1, 1] -> [0, 255], clipped
    assert seen["input2"][0][2].flatten().tolist() == [255, 128, 0, 0]
