"""Per-step compensation of the data prediction, fitted to a model.

A few-step solver's error comes mostly from treating the data prediction as a low-degree
polynomial between knots. DC-Solver (Zhao et al., "DC-Solver: Improving Predictor-Corrector
Diffusion Sampler via Dynamic Compensation", ECCV 2024, Sec. 3.2) shows that extrapolating
the model outputs along the trajectory, by a ratio per step fitted on a handful of
samples, removes much of it. We use the simplest such correction that fits every solver:
at the start of step ``k >= 1`` the solver receives

    D~_k = D_k + c_k (D_k - D_{k-1})

instead of ``D_k = x0_hat(x_k, t_k)``, where ``D_{k-1}`` is the raw prediction at the
previous knot (DC-Solver's Lagrange extrapolation to a shifted time, at first degree).
``c = 0`` is the plain solver; it costs no evaluation. Ratios are not universal: they
belong to one model, guidance scale and grid (:func:`dpmsolver.tune` fits them, stage (f),
against the exact ODE solution of its pilot, and keeps them only where its held-out half
improves).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._validate import check_finite_floats

__all__ = ["Compensation", "check_compensation"]


def check_compensation(
    ratios: Sequence[float] | None, name: str = "compensation"
) -> tuple[float, ...] | None:
    """``ratios`` as a tuple of finite floats (None stays None), else an error naming
    ``name``."""
    if ratios is None:
        return None
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
        kind = type(ratios).__name__
        raise TypeError(f"{name} must be a sequence of numbers or None, got {kind}")
    return check_finite_floats(name, ratios)


class Compensation:
    """Applies the ratios of one run, step by step (module docstring).

    Args:
        ratios: ``c_1 ... c_{n-1}``, one per step after the first.
        steps: the run's steps (each starts with one evaluation at its knot); the ratios
            must number ``steps - 1``.
    """

    def __init__(self, ratios: Sequence[float], steps: int) -> None:
        checked = check_compensation(ratios)
        assert checked is not None
        if len(checked) != steps - 1:
            raise ValueError(
                f"compensation: one ratio per step after the first, i.e. {steps - 1} for "
                f"this plan, got {len(checked)}"
            )
        self.ratios = checked
        self._prev: Tensor | None = None

    def __call__(self, x0: Tensor, index: int) -> Tensor:
        """The prediction the solver receives at the start of step ``index``, from the
        network's ``x0``."""
        prev, self._prev = self._prev, x0
        if index < 1 or prev is None:
            return x0
        c = self.ratios[index - 1]
        return x0 if c == 0.0 else x0.add(x0 - prev, alpha=c)
