"""Per-step correction of the data prediction in the trajectory's own principal directions.

PAS (Wang et al., "Diffusion Sampling Correction via Approximately 10 Parameters", ICML
2025, Sec. 3) observes that a few-step sampler's trajectory stays close to a
low-dimensional subspace spanned by its start and the directions it has taken, and corrects
each step's direction by a handful of coordinates in that subspace's principal directions,
shared by every sample and fitted per model against exact trajectories. In our
data-prediction loop the same subspace is spanned by the start state ``x_T`` and the data
predictions so far (each state is a combination of the start and of them), so at the start
of step ``k`` the solver receives

    D~_k = D_k + r_k sum_j c_{k,j} u_{k,j}

where ``u_{k,0} = D_k / |D_k|`` and ``u_{k,1..}`` are the leading principal directions of
``{x_T, D~_0, ..., D~_{k-1}, D_k}`` (per sample, uncentred, made orthonormal to those before
them), ``r_k = |D_k| / sqrt(numel)`` is the sample's RMS data-prediction size (PAS's
coordinates are absolute; scaled ones carried over between samples of different sizes on
our suite's mixtures: a scratch study, ``benchmarks/stage_g.md``) and ``c_k`` are the step's
coefficients. ``c = 0`` is the plain solver; it costs no evaluation. Each direction's sign
is fixed by the data (its inner product with ``D_k - x_T`` is made non-negative), not by the
eigensolver, so the same coefficients mean the same correction on every device. Where PAS
fits the coefficients by gradient descent on an L1 loss, :func:`dpmsolver.tune` (stage (g))
fits them by least squares, step by step, against the exact trajectory at the next knot:
the step's end is affine in ``D~_k`` for the multistep solvers it applies to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._validate import check_finite_floats

__all__ = ["Correction", "check_correction", "trajectory_basis"]

#: The most coordinates per step (PAS uses up to 4).
MAX_COMPONENTS = 8

Advance = Callable[[Tensor], Tensor]


def check_correction(
    coefficients: Sequence[Sequence[float]] | None, name: str = "correction"
) -> tuple[tuple[float, ...], ...] | None:
    """``coefficients`` as a tuple of equally long tuples of finite floats, one per step (None
    stays None), else an error naming ``name``."""
    if coefficients is None:
        return None
    if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Sequence):
        kind = type(coefficients).__name__
        raise TypeError(f"{name} must be a sequence of per-step sequences or None, got {kind}")
    out: list[tuple[float, ...]] = []
    for i, row in enumerate(coefficients):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"{name}[{i}] must be a sequence of numbers")
        out.append(check_finite_floats(f"{name}[{i}]", row))
    widths = {len(r) for r in out}
    if len(widths) > 1 or (widths and not 1 <= widths.pop() <= MAX_COMPONENTS):
        raise ValueError(
            f"{name}: every step needs the same number of coefficients, 1 to {MAX_COMPONENTS}"
        )
    return tuple(out)


def trajectory_basis(x0: Tensor, history: Sequence[Tensor], components: int) -> Tensor:
    """Per sample, ``components`` orthonormal directions, shape ``(batch, components,
    numel)``: ``x0``'s own, then the leading principal directions of ``history`` and ``x0``
    (module docstring). A direction the history cannot supply (too few vectors) is zero."""
    b = x0.shape[0]
    v = x0.reshape(b, -1)
    basis = [v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)]
    if components > 1:
        h = torch.stack([t.reshape(b, -1).to(v.dtype) for t in history] + [v], 1)
        # the principal directions from the small Gram matrix: numel may be large
        vals, vecs = torch.linalg.eigh(h @ h.transpose(1, 2))
        order = vals.argsort(dim=1, descending=True)
        vecs = torch.gather(vecs, 2, order.unsqueeze(1).expand_as(vecs))
        ref = v - history[0].reshape(b, -1).to(v.dtype)
        for j in range(components - 1):
            if j >= h.shape[1]:
                basis.append(torch.zeros_like(v))
                continue
            w = (vecs[:, :, j].unsqueeze(2) * h).sum(1)
            for q in basis:
                w = w - (w * q).sum(1, keepdim=True) * q
            n = w.norm(dim=1, keepdim=True)
            # a direction lost in rounding (the history spans fewer) must not be amplified
            ok = n > 1e-6 * v.norm(dim=1, keepdim=True)
            w = torch.where(ok, w / n.clamp_min(torch.finfo(v.dtype).tiny), 0.0)
            sign = torch.where((w * ref).sum(1, keepdim=True) < 0, -1.0, 1.0)
            basis.append(w * sign)
    return torch.stack(basis, 1)


def _scale(x0: Tensor) -> Tensor:
    """Each sample's RMS size, shaped to multiply ``(batch, components, numel)``."""
    flat = x0.reshape(x0.shape[0], -1)
    return (flat.norm(dim=1) / math.sqrt(flat.shape[1])).view(-1, 1, 1)


class Correction:
    """Applies the coefficients of one run, step by step (module docstring).

    Args:
        coefficients: one tuple of coordinates per step of the plan.
        steps: the plan's steps; the coefficients must number as many.
        start: the run's start state ``x_T``.
    """

    def __init__(self, coefficients: Sequence[Sequence[float]], steps: int, start: Tensor):
        checked = check_correction(coefficients)
        assert checked is not None
        if len(checked) != steps:
            raise ValueError(
                f"correction: one tuple of coefficients per step, i.e. {steps} for this "
                f"plan, got {len(checked)}"
            )
        self.coefficients = checked
        self.history: list[Tensor] = [start]

    def directions(self, x0: Tensor) -> Tensor:
        """The step's scaled directions ``r u``, shape ``(batch, components, numel)``."""
        m = len(self.coefficients[0]) if self.coefficients else 1
        return trajectory_basis(x0, self.history, m) * _scale(x0)

    def coordinates(self, x0: Tensor, index: int, advance: Advance | None) -> Sequence[float]:
        """The coordinates of step ``index`` (a fit overrides this; ``advance(D~)`` is the
        step's end from the prediction ``D~``)."""
        return self.coefficients[index]

    def __call__(self, x0: Tensor, index: int, advance: Advance | None = None) -> Tensor:
        """The prediction the solver receives at the start of step ``index`` (``advance``:
        the step's end from a prediction, which a fit needs)."""
        c = self.coordinates(x0, index, advance)
        if any(c):
            u = self.directions(x0)
            coef = torch.tensor(c, dtype=u.dtype, device=u.device)
            x0 = x0 + torch.einsum("bmd,m->bd", u, coef).reshape(x0.shape).to(x0.dtype)
        self.history.append(x0)
        return x0


class CorrectionFit(Correction):
    """Fits each step's coordinates while the run goes (stage (g) of :func:`dpmsolver.tune`):
    least squares of the step's end against ``targets[index]`` (the exact state at the step's
    end knot, the exact sample after the last step), with a small ridge (``ridge`` times the
    normal matrix's mean diagonal) for directions the rows barely see.

    Args:
        components: coordinates per step.
        steps: the plan's steps.
        start: the run's start state.
        targets: one target per step, shaped like the state.
    """

    RIDGE = 1e-3

    def __init__(
        self, components: int, steps: int, start: Tensor, targets: Sequence[Tensor]
    ) -> None:
        super().__init__([[0.0] * components] * steps, steps, start)
        self.targets = targets
        self.fitted: list[tuple[float, ...]] = []

    def coordinates(self, x0: Tensor, index: int, advance: Advance | None) -> Sequence[float]:
        if advance is None:
            raise ValueError("a correction fit needs the step's advance")
        u = self.directions(x0)
        base = advance(x0)
        wide = torch.float64
        cols = [advance(x0 + u[:, j].reshape(x0.shape)) - base for j in range(u.shape[1])]
        a = torch.stack([col.reshape(-1) for col in cols], 1).to(wide)
        r = (self.targets[index].to(base) - base).reshape(-1).to(wide)
        ata = a.T @ a
        ridge = self.RIDGE * float(ata.diagonal().mean()) + torch.finfo(wide).tiny
        eye = torch.eye(len(cols), dtype=wide, device=a.device)
        c = torch.linalg.solve(ata + ridge * eye, a.T @ r)
        fitted = tuple(float(v) if math.isfinite(float(v)) else 0.0 for v in c.cpu())
        self.fitted.append(fitted)
        return fitted
