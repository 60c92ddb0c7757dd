"""Parameterizations: what the network outputs, and how to turn it into a data prediction.

With ``x_t = alpha x_0 + sigma eps`` every common network output is affine in ``x_t``
(DPM-Solver++, Sec. 3; Salimans & Ho 2022 for v; Lipman et al. 2023 for flow):

- ``eps``:   x0 = (x - sigma eps) / alpha
- ``x0``:    x0 = output
- ``v``:     v = alpha eps - sigma x0     ->  x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)
- ``score``: score = -eps / sigma         ->  x0 = (x + sigma^2 score) / alpha
- ``flow``:  u = eps - x0                 ->  x0 = (x - sigma u) / (alpha + sigma)

(the v and flow forms reduce to the familiar ``alpha x - sigma v`` and ``x - t u`` on VP
and rectified-flow schedules). Because the maps are affine with the same coefficients for
every batch row, classifier-free guidance may combine raw outputs of any type.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ._validate import check_choice

__all__ = ["PREDICTIONS", "Prediction", "data_coefficients", "from_data", "to_data", "to_noise"]

Prediction = Literal["eps", "x0", "v", "score", "flow"]
PREDICTIONS: tuple[Prediction, ...] = ("eps", "x0", "v", "score", "flow")


def data_coefficients(prediction: Prediction, alpha: float, sigma: float) -> tuple[float, float]:
    """Return ``(cx, co)`` with ``x0 = cx * x + co * output`` for this parameterization."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "x0":
        return 0.0, 1.0
    if prediction == "v":
        norm = alpha * alpha + sigma * sigma
        return alpha / norm, -sigma / norm
    if prediction == "score":
        return 1.0 / alpha, sigma * sigma / alpha
    norm = alpha + sigma
    return 1.0 / norm, -sigma / norm


def to_data(
    output: Tensor, x: Tensor, alpha: float, sigma: float, prediction: Prediction
) -> Tensor:
    """Convert a network output to the data prediction ``x0_hat``."""
    cx, co = data_coefficients(prediction, alpha, sigma)
    if cx == 0.0:
        return output * co if co != 1.0 else output
    return x * cx + output * co


def to_noise(x0: Tensor, x: Tensor, alpha: float, sigma: float) -> Tensor:
    """Noise prediction implied by a data prediction: ``eps = (x - alpha x0) / sigma``."""
    return (x - x0 * alpha) / sigma


def from_data(x0: Tensor, x: Tensor, alpha: float, sigma: float, prediction: Prediction) -> Tensor:
    """Inverse of :func:`to_data`: the network output that yields ``x0`` at ``x``. Written
    through ``eps = (x - alpha x0) / sigma``, so it stays defined at pure noise
    (``alpha = 0``, where ``eps = x / sigma`` whatever ``x0``)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "x0":
        return x0
    eps = (x - x0 * alpha) / sigma
    if prediction == "eps":
        return eps
    if prediction == "v":
        return eps * alpha - x0 * sigma
    if prediction == "score":
        return eps * (-1.0 / sigma)
    return eps - x0
