"""Every parameterization converts to data and noise predictions and back."""

from __future__ import annotations

import pytest
import torch

from dpmsolver.parameterization import PREDICTIONS, from_data, to_data, to_noise


def definition(
    prediction: str, x0: torch.Tensor, eps: torch.Tensor, a: float, s: float
) -> torch.Tensor:
    """The network target written from its definition."""
    return {
        "eps": eps,
        "x0": x0,
        "v": a * eps - s * x0,
        "score": -eps / s,
        "flow": eps - x0,
    }[prediction]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    ("alpha", "sigma"), [(0.9, 0.4358898943540674), (0.05, 0.998749), (1.0, 3.0), (0.3, 0.7)]
)
def test_conversions(prediction: str, alpha: float, sigma: float) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, dtype=torch.float64, generator=g)
    eps = torch.randn(3, 5, dtype=torch.float64, generator=g)
    x = alpha * x0 + sigma * eps
    out = definition(prediction, x0, eps, alpha, sigma)
    assert torch.allclose(to_data(out, x, alpha, sigma, prediction), x0, atol=1e-12)  # type: ignore[arg-type]
    assert torch.allclose(to_noise(x0, x, alpha, sigma), eps, atol=1e-12)
    back = from_data(x0, x, alpha, sigma, prediction)  # type: ignore[arg-type]
    assert torch.allclose(back, out, atol=1e-10)


def test_unknown_prediction_is_named() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"prediction='epsilon'.*accepted values: 'eps'"):
        to_data(x, x, 1.0, 1.0, "epsilon")  # type: ignore[arg-type]
