"""Fast CPU checks of the shipped digits demo weights (denoiser + classifier)."""

from __future__ import annotations

import json

import pytest
import torch

from dpmsolver.digits import (
    DIGITS_SCHEDULE,
    DigitsClassifier,
    DigitsUNet,
    load_classifier,
    load_default_model,
)
from dpmsolver.digits.load import CLASSIFIER_FILE, DENOISER_FILE, WEIGHTS_DIR, read_metadata

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module")
def model() -> DigitsUNet:
    return load_default_model()


def _acp() -> torch.Tensor:
    """Scaled-linear schedule, recomputed independently from the schedule dict."""
    s = DIGITS_SCHEDULE
    n = s["num_train_timesteps"]
    betas = torch.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, n, dtype=torch.float64)
    return torch.cumprod(1 - betas**2, 0).float()


def test_schedule_description() -> None:
    assert DIGITS_SCHEDULE["kind"] == "discrete_vp"
    assert DIGITS_SCHEDULE["beta_schedule"] == "scaled_linear"
    assert DIGITS_SCHEDULE["num_train_timesteps"] == 1000
    assert DIGITS_SCHEDULE["prediction"] == "eps"
    assert DIGITS_SCHEDULE["null_label"] == 10
    meta = read_metadata(WEIGHTS_DIR / DENOISER_FILE)
    assert json.loads(meta["schedule"]) == DIGITS_SCHEDULE
    assert meta["weights"] == "ema"


def test_weights_are_self_describing_and_small() -> None:
    for name, kind in ((DENOISER_FILE, "DigitsUNet"), (CLASSIFIER_FILE, "DigitsClassifier")):
        path = WEIGHTS_DIR / name
        meta = read_metadata(path)
        assert meta["model"] == kind
        assert isinstance(json.loads(meta["config"]), dict)
        assert path.stat().st_size < 5_000_000


def test_models_load_in_eval_mode(model: DigitsUNet, clf: DigitsClassifier) -> None:
    assert not model.training and not clf.training
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 2_000_000
    assert next(model.parameters()).dtype == torch.float32


@torch.no_grad()
def test_denoiser_shapes_and_batch_one(model: DigitsUNet) -> None:
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model(x, torch.tensor([10.0, 500.0, 999.0]), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 1, 8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    one = model(x[1:2], torch.tensor([500.0]), torch.tensor([5]))
    assert one.shape == (1, 1, 8, 8)
    # Batch composition must not matter (no batch statistics at inference).
    torch.testing.assert_close(one, out[1:2], atol=1e-5, rtol=1e-4)
    # Scalar t and y broadcast over the batch.
    scalar = model(x, torch.tensor(500.0), torch.tensor(5))
    torch.testing.assert_close(scalar[1:2], one, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_non_integer_timesteps(model: DigitsUNet) -> None:
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3, 10])
    lo = model(x, torch.full((4,), 400.0), y)
    mid = model(x, torch.full((4,), 400.5), y)
    hi = model(x, torch.full((4,), 401.0), y)
    assert torch.isfinite(mid).all()
    assert not torch.equal(mid, lo)
    # Smooth in t: the half step lies between neighbouring integer steps' outputs.
    assert (mid - (lo + hi) / 2).abs().max() < 0.05


@torch.no_grad()
def test_reduced_precision_inference() -> None:
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([300.0, 700.5]), torch.tensor([4, 10])
    ref = load_default_model()(x, t, y)
    half = load_default_model(dtype=torch.bfloat16)
    out = half(x.to(torch.bfloat16), t, y)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 8, 8)
    assert (out.float() - ref).abs().max() < 0.15


@torch.no_grad()
def test_half_precision_on_the_available_device() -> None:
    """float16 on CUDA when present; on CPU the same path in bfloat16 (CPU half convs are
    not universally supported)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    m = load_default_model(device=device, dtype=dtype)
    x = torch.randn(2, 1, 8, 8, device=device, dtype=dtype)
    out = m(x, torch.tensor([10.5, 900.0], device=device), torch.tensor([1, 10], device=device))
    assert out.dtype == dtype and out.device.type == device and torch.isfinite(out).all()
    assert load_classifier(device)(x.float()).shape == (2, 10)


@torch.no_grad()
def test_classifier_accuracy_and_features(clf: DigitsClassifier, split: Split) -> None:
    _, _, x_test, y_test = split
    assert x_test.shape == (360, 1, 8, 8)
    assert x_test.min() >= -1 and x_test.max() <= 1
    logits = clf(x_test)
    assert logits.shape == (360, 10)
    acc = (logits.argmax(1) == y_test).float().mean().item()
    assert acc >= 0.95, acc
    feats = clf.features(x_test[:5])
    assert feats.ndim == 2 and feats.shape[0] == 5 and 64 <= feats.shape[1] <= 128
    assert clf(x_test[:1]).shape == (1, 10)


@torch.no_grad()
def test_denoiser_beats_trivial_predictor(model: DigitsUNet, split: Split) -> None:
    _, _, x0, y = split
    acp = _acp()
    gen = torch.Generator().manual_seed(123)
    bounds = {100: 0.5, 500: 0.2, 900: 0.2}
    for t, bound in bounds.items():
        eps = torch.randn(x0.shape, generator=gen)
        xt = acp[t].sqrt() * x0 + (1 - acp[t]).sqrt() * eps
        mse = (model(xt, torch.full((len(y),), float(t)), y) - eps).pow(2).mean().item()
        assert mse < bound, (t, mse)


@torch.no_grad()
def test_conditioning_matters(model: DigitsUNet, split: Split) -> None:
    _, _, x0, y = split
    acp = _acp()
    t = 600
    x0, y = x0[:64], y[:64]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    xt = acp[t].sqrt() * x0 + (1 - acp[t]).sqrt() * eps
    tt = torch.full((64,), float(t))
    cond = model(xt, tt, y)
    null = model(xt, tt, torch.full_like(y, 10))
    wrong = model(xt, tt, (y + 1) % 10)
    assert (cond - null).pow(2).mean() > 1e-3
    # The right label explains the noise better than a wrong one.
    assert (cond - eps).pow(2).mean() < (wrong - eps).pow(2).mean()
