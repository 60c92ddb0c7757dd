"""The one denoiser contract every solver consumes: ``x0_hat = D(x, knot)``.

A *network* is any callable ``model(x, t, **kwargs) -> output`` where ``t`` is a ``(B,)``
tensor of the times the network was trained with. :class:`ModelDenoiser` turns it into a
*denoiser* by applying the schedule's model time and the parameterization
(:mod:`dpmsolver.parameterization`). Guidance and correctors are denoiser -> denoiser
wrappers (:mod:`dpmsolver.guidance`); solvers only ever see a denoiser. The noise
prediction, where a solver needs it, is derived from ``x0_hat`` (DPM-Solver++, Eq. 8).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from ._validate import check_choice
from .parameterization import PREDICTIONS, Prediction, to_data
from .schedules import Knot

__all__ = ["Denoiser", "ModelDenoiser", "Network", "time_tensor"]

Network = Callable[..., Tensor]


class Denoiser(Protocol):
    """Anything that maps a noisy state at a resolved noise level to a data prediction."""

    def __call__(self, x: Tensor, knot: Knot, /) -> Tensor: ...


def time_tensor(x: Tensor, value: float) -> Tensor:
    """A ``(B,)`` tensor holding the network time ``value`` on ``x``'s device.

    float64 states get a float64 time (exactness in tests); everything else float32.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), value, dtype=dtype, device=x.device)


class ModelDenoiser:
    """Wrap a network that predicts ``eps``, ``x0``, ``v``, ``score`` or ``flow``.

    Args:
        model: ``model(x, t, **model_kwargs) -> output`` of ``x``'s shape.
        prediction: what the network outputs (default ``"eps"``).
        model_kwargs: extra keyword arguments for every call (conditioning), default none.
        model_dtype: dtype the network runs in (e.g. ``torch.float16``); the state is cast
            to it for the call and the output cast back, so solver arithmetic stays in the
            state's precision. Default: the state's dtype.
    """

    def __init__(
        self,
        model: Network,
        prediction: Prediction = "eps",
        *,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.prediction: Prediction = check_choice("prediction", prediction, PREDICTIONS)
        self.model_kwargs = dict(model_kwargs or {})
        self.model_dtype = model_dtype

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        x_in = x if self.model_dtype is None else x.to(self.model_dtype)
        out = self.model(x_in, time_tensor(x, knot.model_t), **self.model_kwargs)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"model output must be a tensor of the input's shape {tuple(x.shape)}, got {got}"
            )
        return to_data(out.to(x.dtype), x, knot.alpha, knot.sigma, self.prediction)
