"""Empirical model statistics (EMS) for DPM-Solver-v3.

Zheng, Lu, Chen, Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical
Model Statistics" (NeurIPS 2023, arXiv 2310.13268), Sec. 3.1-3.2 and App. C.1.1.

In the paper's notation (half log-SNR ``lambda``, ``' = d/dlambda`` along the ODE), the
probability-flow ODE ``dx/dlambda = (alpha'/alpha) x - sigma eps_theta`` is rewritten with a
per-dimension coefficient ``l_lambda`` (Sec. 3.1, the reformulated ODE):

    dx/dlambda = (alpha'/alpha - l) x - N_theta,      N_theta = sigma eps_theta - l x,

and the scaled remainder ``f_theta = N_theta / alpha`` (the official code's ``f``) is
linearised along the trajectory with ``s_lambda``, ``b_lambda``:

    g_theta(x_lambda, lambda) = e^{-Int_{lambda_s}^{lambda} s} f_theta
                                - Int_{lambda_s}^{lambda} e^{-Int_{lambda_s}^{r} s} b_r dr,

which is constant in ``lambda`` when ``f' = s f + b`` holds exactly. With the denoiser
contract ``x0_hat = D(x, knot)`` and ``y = x / alpha`` (k-diffusion's ``x~``):

    f = (1 - l) y - x0_hat,      dy/dlambda = x0_hat - y,
    f' = -l' y + (1 - l)(x0_hat - y) - dx0_hat/dlambda.

The statistics (Sec. 3.2, the two minimisation problems defining ``l*`` and ``(s*, b*)``):

- ``l*_lambda = argmin_l E_{p_lambda} ||grad_x N_theta||_F^2``. Since ``grad_x N_theta =
  sigma grad_x eps_theta - diag(l) = I - alpha grad_x D - diag(l)``, the minimiser is the
  expected diagonal, ``l* = E[diag(sigma grad_x eps)] = 1 - alpha E[diag(grad_x D)]``. The
  diagonal is estimated with Jacobian-vector products and Rademacher probes ``v``,
  ``diag(J) ~ E_v[v * (J v)]`` (App. C.1.1; the official statistics script does the same).
- ``(s*, b*) = argmin E ||f' - s f - b||^2``, per dimension a least-squares line:
  ``s = Cov(f, f') / Var(f)``, ``b = E f' - s E f``.

When ``l = 1, s = b = 0`` the formulation is DPM-Solver++'s data-prediction one (paper App.
A.2; the official code's ``degenerated=True``).

Equation numbers. We could not read the paper's full text from this workplace (only its
abstract, the official repository ``thu-ml/DPM-Solver-v3``, whose ``dpm_solver_v3.py``
consumes precomputed ``l.npz``/``sb.npz``, and a public EMS-computation script in the
score_sde codebase's layout that follows App. C.1.1: ``l`` from Rademacher JVPs, ``l'`` by
smoothed central differences, ``s, b`` by least squares), so definitions are cited by
section and by the official code's names (``l``, ``s``, ``b``, ``f``, ``f_d``, ``L``, ``S``,
``B``, ``I``, ``C``). The one number we could confirm is Eq. (8), the (n+1)-th order local
approximation with coefficients a, b, c (Fig. 2's caption refers to it), which
:mod:`dpmsolver.solvers.v3` implements.

Where we differ from that computation (deliberately, documented here):

- Where the expectations are taken: besides the paper's noised samples
  (``x_lambda = alpha x0 + sigma z``), :func:`estimate_ems` can take them over the states
  of the model's own ODE trajectories (``noise=``). With guidance the two differ, and only
  the trajectories are what a sampler meets (``benchmarks/v3_study.md``, (b)).

- Common random numbers: every grid point uses the same data samples, the same noise ``z``
  and the same probes ``v`` (``x_lambda = alpha x0 + sigma z``), so the estimates are smooth
  functions of ``lambda`` and ``l'`` can be taken from them without the official script's
  moving-average smoothing. Each point is still an unbiased Monte Carlo estimate.
- One pass: ``l``, ``l'`` enter ``f`` and ``f'`` linearly, so each grid point stores the raw
  first and second moments of ``(y, x0_hat, dx0_hat/dlambda)`` and ``s, b`` are assembled
  once ``l`` is known on the whole grid (the official script makes two passes).
- The total derivative ``dx0_hat/dlambda`` is a central difference along the ODE tangent,
  ``[D(x(lambda + d), lambda + d) - D(x(lambda - d), lambda - d)] / 2d`` with
  ``y(lambda +- d) = y +- d (x0_hat - y)`` (second-order accurate: the curvature terms of
  the two ends cancel), because the denoiser contract takes a resolved noise level, not a
  differentiable time. The official script uses forward-mode AD in ``(x, t)``.

The statistics live on a uniform ``lambda`` grid; between grid points the solver uses the
natural cubic spline through them (:class:`EMSSpline`), whose integrals it takes exactly
(``Int l``, ``Int s``) or by Gauss-Legendre quadrature (the rest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ._validate import check_choice, check_finite_float, check_int
from .analytic import GaussianMixture
from .denoiser import Denoiser
from .progress import Progress
from .schedules import (
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    Knot,
    NoiseSchedule,
    RectifiedFlowSchedule,
    VESchedule,
)

if TYPE_CHECKING:  # model -> sampling -> solvers.v3 -> ems: imported where used
    from .model import LoadedModel

__all__ = [
    "EMS",
    "FORMAT_VERSION",
    "CheckpointError",
    "EMSFingerprint",
    "EMSSpline",
    "States",
    "estimate_ems",
    "estimate_model_ems",
    "host_to_device",
    "mixture_ems",
    "mixture_x0_and_diag",
    "schedule_fingerprint",
]

#: Version of the file layout written by :meth:`EMS.save`.
FORMAT_VERSION = 1
_FORMAT = "dpmsolver-ems"
#: The statistics' tensors, in the order :class:`EMS` takes them.
_TENSORS = ("lams", "l", "s", "b")
_CHECKPOINT_FORMAT = "dpmsolver-ems-checkpoint"
Source = Literal["estimated", "exact", "synthetic", "degenerate"]

# Per-grid-point sums, in this order (per dimension, over samples):
#   diag = v * (grad_x D v),  y,  c = x0_hat,  d = dx0_hat/dlambda,  y^2, y c, y d, c^2, c d
_MOMENTS = ("diag", "y", "c", "d", "yy", "yc", "yd", "cc", "cd")


# ----------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------


def _unwrap(schedule: NoiseSchedule) -> NoiseSchedule:
    """The schedule itself, seen through wrappers that keep a ``base`` schedule (the front
    ends' ``PinnedSchedule`` pins knots but does not change the noise levels)."""
    while isinstance(getattr(schedule, "base", None), NoiseSchedule):
        schedule = schedule.base  # type: ignore[attr-defined]
    return schedule


def schedule_fingerprint(schedule: NoiseSchedule) -> str:
    """A canonical description of ``schedule``: its class and public parameters (tensors by
    SHA-256 of their float64 values), e.g. ``DiscreteVPSchedule(alphas_cumprod=sha256:..,
    num_train_timesteps=1000)``.

    ``t_min``/``t_max`` are left out: they bound the sampling range without changing what a
    noise level means (the EMS grid's coverage is checked on its own).
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    base = _unwrap(schedule)
    items = []
    for key, value in sorted(vars(base).items()):
        if key.startswith("_") or key in ("t_min", "t_max"):
            continue
        if isinstance(value, Tensor):
            data = value.detach().to(torch.float64).contiguous().cpu().numpy().tobytes()
            items.append(f"{key}=sha256:{hashlib.sha256(data).hexdigest()[:16]}")
        elif isinstance(value, (bool, int, float, str)):
            items.append(f"{key}={value!r}")
    return f"{type(base).__name__}({', '.join(items)})"


@dataclass(frozen=True)
class EMSFingerprint:
    """What the statistics were computed for; ``None`` fields match anything (synthetic
    statistics that describe no model).

    Attributes:
        schedule: :func:`schedule_fingerprint` of the model's schedule.
        prediction: the network's parameterization (``"eps"``, ``"v"``, ...).
        guidance_scale: the classifier-free guidance weight built into the denoiser.
    """

    schedule: str | None = None
    prediction: str | None = None
    guidance_scale: float | None = None


# ----------------------------------------------------------------------------------------
# The statistics
# ----------------------------------------------------------------------------------------


def _as_grid(lams: Tensor) -> Tensor:
    lams = torch.as_tensor(lams, dtype=torch.float64).detach().cpu().contiguous()
    if lams.ndim != 1 or lams.numel() < 4:
        raise ValueError(
            f"ems grid must be 1-D with at least 4 points, got shape {tuple(lams.shape)}"
        )
    if not bool(torch.isfinite(lams).all()):
        raise ValueError("ems grid must be finite")
    steps = lams[1:] - lams[:-1]
    delta = float(steps.mean())
    if not delta > 0 or float((steps - delta).abs().max()) > 1e-9 * max(1.0, abs(delta)):
        raise ValueError("ems grid must be uniform and increasing in lambda")
    return lams


@dataclass(frozen=True)
class EMS:
    """Empirical model statistics ``l, s, b`` on a uniform half-log-SNR grid (Sec. 3.2).

    Attributes:
        lams: ``(M,)`` increasing, uniformly spaced ``lambda`` values (float64).
        l, s, b: ``(M, *shape)`` statistics per grid point and dimension (float64); ``shape``
            is the per-sample shape, or ``()`` for statistics shared by all dimensions.
        fingerprint: the schedule, prediction and guidance scale they describe.
        samples: data samples the estimate used (0 for exact, synthetic or degenerate).
        source: ``"estimated"``, ``"exact"``, ``"synthetic"`` or ``"degenerate"``.
    """

    lams: Tensor
    l: Tensor  # noqa: E741  (the paper's name)
    s: Tensor
    b: Tensor
    fingerprint: EMSFingerprint = field(default_factory=EMSFingerprint)
    samples: int = 0
    source: Source = "estimated"

    def __post_init__(self) -> None:
        lams = _as_grid(self.lams)
        object.__setattr__(self, "lams", lams)
        shape = None
        for name in ("l", "s", "b"):
            v = torch.as_tensor(getattr(self, name), dtype=torch.float64)
            v = v.detach().cpu().contiguous()
            if v.ndim < 1 or v.shape[0] != lams.numel():
                raise ValueError(
                    f"ems.{name} must have shape (M, *shape) with M={lams.numel()} grid points, "
                    f"got {tuple(v.shape)}"
                )
            if shape is not None and v.shape[1:] != shape:
                raise ValueError(f"ems.{name} has shape {tuple(v.shape)}, expected (M, *{shape})")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"ems.{name} has non-finite values")
            shape = v.shape[1:]
            object.__setattr__(self, name, v)
        check_choice("source", self.source, ("estimated", "exact", "synthetic", "degenerate"))
        check_int("samples", self.samples, minimum=0)
        if not isinstance(self.fingerprint, EMSFingerprint):
            got = type(self.fingerprint).__name__
            raise TypeError(f"fingerprint must be an EMSFingerprint, got {got}")

    # -- basic properties --------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape the statistics describe (``()`` = shared by every dimension)."""
        return tuple(self.l.shape[1:])

    @property
    def lam_min(self) -> float:
        """Smallest ``lambda`` of the grid (the noisiest end)."""
        return float(self.lams[0])

    @property
    def lam_max(self) -> float:
        """Largest ``lambda`` of the grid."""
        return float(self.lams[-1])

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the fingerprint."""
        return self.fingerprint.guidance_scale

    def __repr__(self) -> str:  # short: it appears in test ids and benchmark tables
        w = self.fingerprint.guidance_scale
        guide = "" if w is None else f", w={w:g}"
        return (
            f"EMS({self.source}, {self.lams.numel()} pts, lambda [{self.lam_min:.3g}, "
            f"{self.lam_max:.3g}], shape {self.shape}{guide})"
        )

    __str__ = __repr__

    # -- validation ----------------------------------------------------------------------

    def check(
        self,
        *,
        schedule: NoiseSchedule | None = None,
        prediction: str | None = None,
        guidance_scale: float | None = None,
        lam_range: tuple[float, float] | None = None,
    ) -> None:
        """Raise a ValueError if these statistics do not describe the given sampling run:
        another schedule, prediction or guidance scale, or a grid that does not cover
        ``lam_range`` (the run's ``(lambda_start, lambda_end)`` in either order).
        Arguments left at None are not checked, nor are fingerprint fields that are None."""
        fp = self.fingerprint
        if schedule is not None and fp.schedule is not None:
            got = schedule_fingerprint(schedule)
            if got != fp.schedule:
                raise ValueError(
                    f"ems was computed for schedule {fp.schedule} but the sampling run uses "
                    f"schedule {got}; recompute the EMS for this schedule"
                )
        if prediction is not None and fp.prediction is not None and prediction != fp.prediction:
            raise ValueError(
                f"ems was computed for prediction={fp.prediction!r} but the sampling run uses "
                f"prediction={prediction!r}"
            )
        if guidance_scale is not None and fp.guidance_scale is not None:
            w = float(guidance_scale)
            if abs(w - fp.guidance_scale) > 1e-9 * max(1.0, abs(w)):
                raise ValueError(
                    f"ems was computed for guidance_scale={fp.guidance_scale:g} but the sampling "
                    f"run uses guidance_scale={w:g}; the statistics depend on the guided denoiser"
                )
        if lam_range is not None:
            self.check_covers(*lam_range)

    def in_any_schedule(self) -> EMS:
        """These statistics without their schedule fingerprint. The statistics live in
        half log-SNR and in ``y = x / alpha``, so they are the same in every variables of
        the same model (k-diffusion's ``x / alpha, sigma / alpha`` included); a front end
        that runs the model on another schedule object of the same noise levels uses
        this. The prediction and guidance scale still describe the model."""
        return dataclasses.replace(
            self, fingerprint=dataclasses.replace(self.fingerprint, schedule=None)
        )

    def check_covers(self, lam_a: float, lam_b: float) -> None:
        """Raise a ValueError if ``[lam_a, lam_b]`` (either order) leaves the grid."""
        lo, hi = min(lam_a, lam_b), max(lam_a, lam_b)
        tol = 1e-9 * max(1.0, abs(self.lam_min), abs(self.lam_max))
        if not (lo >= self.lam_min - tol and hi <= self.lam_max + tol):
            raise ValueError(
                f"ems grid covers lambda in [{self.lam_min:.6g}, {self.lam_max:.6g}] but the "
                f"sampling interval needs [{lo:.6g}, {hi:.6g}]; recompute the EMS with a "
                "lam_range that covers it"
            )

    # -- construction helpers ------------------------------------------------------------

    @classmethod
    def degenerate(
        cls,
        lam_range: tuple[float, float] = (-20.0, 20.0),
        points: int = 5,
        shape: Sequence[int] = (),
    ) -> EMS:
        """``l = 1, s = b = 0``: DPM-Solver-v3 reduces to DPM-Solver++ (paper App. A.2; the
        official code's ``degenerated=True``). Matches any model (no fingerprint)."""
        lams = torch.linspace(lam_range[0], lam_range[1], points, dtype=torch.float64)
        ones = torch.ones(points, *shape, dtype=torch.float64)
        return cls(lams, ones, torch.zeros_like(ones), torch.zeros_like(ones), source="degenerate")

    @classmethod
    def synthetic(cls, lam_range: tuple[float, float] = (-15.0, 15.0), points: int = 301) -> EMS:
        """Smooth statistics that describe no model, shared by every dimension, shaped like
        fitted ones (``l -> 1``, ``s, b -> 0`` at high noise, where ``f`` is then ``-x0_hat``):
        ``l = 1 - 0.8 sigmoid(2 lambda - 2)``, ``s = -1.5 sigmoid(1.5 lambda - 1)``,
        ``b = 0.15 sigmoid(2 lambda) cos(lambda)``.

        Any smooth ``l, s, b`` give an exact reformulation of the ODE (Sec. 3.1), so a solver
        keeps its convergence order with them (as long as the first, first-order step stays
        accurate, which the high-noise limits above ensure); the registry's order tests use
        these to run the solver's statistics path on every schedule and shape."""
        lams = torch.linspace(lam_range[0], lam_range[1], points, dtype=torch.float64)
        sig = torch.sigmoid
        return cls(
            lams,
            1.0 - 0.8 * sig(2.0 * lams - 2.0),
            -1.5 * sig(1.5 * lams - 1.0),
            0.15 * sig(2.0 * lams) * torch.cos(lams),
            source="synthetic",
        )

    def spline(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
    ) -> EMSSpline:
        """The continuous ``l, s, b`` the solver uses: natural cubic splines through the grid
        values (host float64; with ``device``, their tables there in ``dtype``), built once
        per EMS object (and device and dtype): a sampler run uses them at every step."""
        cached = self.__dict__.get("_spline")
        if cached is None:
            cached = EMSSpline.from_ems(self)
            self.__dict__["_spline"] = cached  # a cache, not a field: frozen is kept
        if device is None:
            return cached
        moved = self.__dict__.setdefault("_device_splines", {})
        key = (str(torch.device(device)), dtype)
        if key not in moved:
            moved[key] = cached.to(device, dtype)
        return moved[key]

    # -- JSON (inside a tuned profile) ---------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The statistics as JSON-compatible data (a tuned profile carries them:
        :attr:`dpmsolver.tune.TuneOptions.v3_points`); :meth:`from_json` reads it back."""
        return {
            "ems": FORMAT_VERSION,
            **{k: getattr(self, k).tolist() for k in _TENSORS},
            **self._fields(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EMS:
        """Statistics from :meth:`to_json`'s data (a ValueError for anything else)."""
        if not isinstance(data, Mapping) or data.get("ems") != FORMAT_VERSION:
            raise ValueError(f"not EMS data of format version {FORMAT_VERSION}")
        return cls._from_fields(
            {k: torch.tensor(data[k], dtype=torch.float64) for k in _TENSORS}, data
        )

    def _fields(self) -> dict[str, Any]:
        """Everything but the tensors, as both encodings (JSON, a file's metadata) keep it."""
        fp = self.fingerprint
        return {
            "schedule": fp.schedule,
            "prediction": fp.prediction,
            "guidance_scale": fp.guidance_scale,
            "samples": self.samples,
            "source": self.source,
        }

    @classmethod
    def _from_fields(cls, tensors: Mapping[str, Tensor], fields: Mapping[str, Any]) -> EMS:
        """The inverse of :meth:`_fields` (a missing or empty entry is None), with the
        tensors ``lams, l, s, b``."""
        w = fields.get("guidance_scale")
        lams, ls, ss, bs = (tensors[k] for k in _TENSORS)
        return cls(
            lams,
            ls,
            ss,
            bs,
            EMSFingerprint(
                fields.get("schedule") or None,
                fields.get("prediction") or None,
                None if w is None or w == "" else float(w),
            ),
            samples=int(fields.get("samples", 0)),
            source=fields.get("source", "estimated"),
        )

    # -- files ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file: tensors ``lams, l, s, b`` and the fingerprint, source,
        sample count and format version in its metadata (written atomically)."""
        save_file = _safetensors().save_file
        meta = {"format": _FORMAT, "format_version": str(FORMAT_VERSION)}
        # safetensors metadata holds strings only: None is written as ""
        meta.update({k: "" if v is None else str(v) for k, v in self._fields().items()})
        tensors = {k: getattr(self, k) for k in _TENSORS}
        from .io import atomic_write

        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EMS:
        """Read a file written by :meth:`save`; a ValueError names the file if it is not one
        (corrupt, another format, or another format version)."""
        tensors, meta = _read_safetensors(path, "ems")
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"ems file {os.fspath(path)!r} is not a dpmsolver EMS file "
                f"(format={meta.get('format')!r}, expected {_FORMAT!r})"
            )
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(
                f"ems file {os.fspath(path)!r} has format_version={meta.get('format_version')!r}; "
                f"this dpmsolver reads version {FORMAT_VERSION}"
            )
        missing = sorted(set(_TENSORS) - set(tensors))
        if missing:
            raise ValueError(f"ems file {os.fspath(path)!r} lacks tensors {missing}")
        try:
            return cls._from_fields(tensors, meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"ems file {os.fspath(path)!r} is invalid: {e}") from None


def _safetensors():  # type: ignore[no-untyped-def]
    try:
        import safetensors.torch as st
    except ImportError:  # pragma: no cover - safetensors is a demo/test extra
        raise ImportError(
            "saving and loading EMS files needs safetensors: pip install safetensors"
        ) from None
    return st


def _read_safetensors(
    path: str | os.PathLike[str], what: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; ValueError (naming ``what`` and the file)
    for anything that is not one."""
    st = _safetensors()
    from safetensors import safe_open

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{what} file {p!r} does not exist")
    try:
        with safe_open(p, framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = st.load_file(p, device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{what} file {p!r} is corrupt or not a safetensors file ({e})") from None
    return tensors, meta


# ----------------------------------------------------------------------------------------
# Continuous statistics: natural cubic splines on the uniform grid
# ----------------------------------------------------------------------------------------


def _natural_spline(values: Tensor, delta: float) -> Tensor:
    """Polynomial coefficients ``(M - 1, 4, *shape)`` of the natural cubic spline through
    ``values`` (``(M, *shape)``) on a uniform grid of spacing ``delta``: on interval ``j``,
    ``p(d) = c0 + c1 d + c2 d^2 + c3 d^3`` with ``d = lambda - lambda_j``."""
    m_pts = values.shape[0]
    y = values
    # Second derivatives m_j: m_0 = m_{M-1} = 0 and
    # m_{j-1} + 4 m_j + m_{j+1} = 6 (y_{j+1} - 2 y_j + y_{j-1}) / delta^2.
    rhs = 6.0 * (y[2:] - 2.0 * y[1:-1] + y[:-2]) / (delta * delta)
    n = m_pts - 2
    cp = [0.0] * n
    dp: list[Tensor] = []
    for j in range(n):  # Thomas algorithm, vectorised over dimensions
        denom = 4.0 - (cp[j - 1] if j else 0.0)
        cp[j] = 1.0 / denom
        dp.append((rhs[j] - (dp[j - 1] if j else 0.0)) / denom)
    inner: list[Tensor] = [dp[-1]] * n
    for j in range(n - 2, -1, -1):
        inner[j] = dp[j] - cp[j] * inner[j + 1]
    zero = torch.zeros_like(y[0])
    m = torch.stack([zero, *inner, zero])
    c0 = y[:-1]
    c1 = (y[1:] - y[:-1]) / delta - delta * (2.0 * m[:-1] + m[1:]) / 6.0
    c2 = m[:-1] / 2.0
    c3 = (m[1:] - m[:-1]) / (6.0 * delta)
    return torch.stack([c0, c1, c2, c3], dim=1)


def host_to_device(
    values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Host numbers as a tensor on ``device`` without a host-device synchronisation: on
    CUDA through pinned memory with ``non_blocking=True`` (a plain copy from pageable
    memory would wait for the work queued before it, e.g. the last network call)."""
    t = torch.tensor(list(values), dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class EMSSpline:
    """``l, s, b`` as functions of ``lambda`` (natural cubic splines through the grid) with
    the running integrals ``L = Int l`` and ``S = Int s`` from the grid's first point.

    Attributes:
        lam0: first grid point; delta: grid spacing; points: number of grid points.
        coef: ``(3, M - 1, 4, *shape)`` polynomial coefficients of l, s, b per interval.
        cum: ``(2, M, *shape)``: ``L`` and ``S`` at the grid points.
    """

    lam0: float
    delta: float
    points: int
    coef: Tensor
    cum: Tensor

    @classmethod
    def from_ems(cls, ems: EMS) -> EMSSpline:
        """Build the splines (host float64)."""
        lams = ems.lams
        delta = float(lams[-1] - lams[0]) / (lams.numel() - 1)
        coef = torch.stack([_natural_spline(v, delta) for v in (ems.l, ems.s, ems.b)])
        # Exact integral of each cubic over its interval: c0 d + c1 d^2/2 + c2 d^3/3 + c3 d^4/4.
        powers = torch.tensor(
            [delta, delta**2 / 2, delta**3 / 3, delta**4 / 4], dtype=torch.float64
        )
        piece = (coef[:2] * powers.view(1, 1, 4, *([1] * len(ems.shape)))).sum(2)
        cum = torch.cat([torch.zeros_like(piece[:, :1]), piece.cumsum(1)], dim=1)
        return cls(float(lams[0]), delta, lams.numel(), coef, cum)

    @property
    def lam_end(self) -> float:
        """Last grid point."""
        return self.lam0 + self.delta * (self.points - 1)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float64) -> EMSSpline:
        """The same splines with their tables on ``device`` in ``dtype`` (done once per run)."""
        return EMSSpline(
            self.lam0,
            self.delta,
            self.points,
            self.coef.to(device=device, dtype=dtype),
            self.cum.to(device=device, dtype=dtype),
        )

    def locate(self, lams: Sequence[float]) -> tuple[list[int], list[float]]:
        """Interval index and offset of each ``lambda`` (host floats; the end intervals
        extend past the grid, which :meth:`EMS.check_covers` guards)."""
        idx, off = [], []
        top = self.points - 2
        for lam in lams:
            j = min(max(math.floor((lam - self.lam0) / self.delta), 0), top)
            idx.append(j)
            off.append(lam - (self.lam0 + j * self.delta))
        return idx, off

    def evaluate(self, idx: Sequence[int], off: Sequence[float]) -> tuple[Tensor, Tensor]:
        """``(values, integrals)`` at the points ``lambda_j + off``: values ``(3, P, *shape)``
        of l, s, b and integrals ``(2, P, *shape)`` of ``L, S`` (from the grid start)."""
        dev, dt = self.coef.device, self.coef.dtype
        index = host_to_device(idx, torch.long, dev)
        d = host_to_device(off, dt, dev).view(1, -1, *([1] * (self.coef.ndim - 3)))
        c = self.coef[:, index]  # (3, P, 4, *shape)
        c0, c1, c2, c3 = c[:, :, 0], c[:, :, 1], c[:, :, 2], c[:, :, 3]
        values = c0 + d * (c1 + d * (c2 + d * c3))
        a0, a1, a2, a3 = c0[:2], c1[:2], c2[:2], c3[:2]
        integrals = self.cum[:, index] + d * (a0 + d * (a1 / 2 + d * (a2 / 3 + d * a3 / 4)))
        return values, integrals

    def at(self, lams: Sequence[float]) -> tuple[Tensor, Tensor]:
        """:meth:`evaluate` at half log-SNR values ``lams``."""
        return self.evaluate(*self.locate(lams))


# ----------------------------------------------------------------------------------------
# Estimation on a model (App. C.1.1)
# ----------------------------------------------------------------------------------------


def _grid_range(
    schedule: NoiseSchedule, lam_range: tuple[float, float] | None
) -> tuple[float, float]:
    if lam_range is None:
        lo, hi = schedule.knot(schedule.t_max).lam, schedule.knot(schedule.t_min).lam
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(
                f"lam_range is required: the schedule's range reaches lambda = {lo} .. {hi}; pass "
                "finite (lambda_min, lambda_max) that cover the sampling interval"
            )
        return lo, hi
    lo = check_finite_float("lam_range[0]", lam_range[0])
    hi = check_finite_float("lam_range[1]", lam_range[1])
    if not lo < hi:
        raise ValueError(f"lam_range must be increasing, got {lam_range}")
    return lo, hi


def _finalize(
    sums: Tensor, count: int, lams: Tensor, alphas: Sequence[float]
) -> tuple[Tensor, Tensor, Tensor]:
    """``l, s, b`` from the per-point sums ``(M, 9, *shape)`` over ``count`` samples."""
    mean = sums / count
    diag, ey, ec, ed, eyy, eyc, eyd, ecc, ecd = mean.unbind(1)
    alpha = torch.tensor(list(alphas), dtype=torch.float64).view(-1, *([1] * (diag.ndim - 1)))
    l = 1.0 - alpha * diag  # noqa: E741  l* = E[diag(sigma grad eps)] = 1 - alpha E[diag(grad D)]
    delta = float(lams[1] - lams[0])
    dl = torch.gradient(l, spacing=delta, dim=0, edge_order=2)[0]
    a1 = 1.0 - l
    # f = a1 y - c,  f' = (-l' - a1) y + a1 c - d
    ef = a1 * ey - ec
    efd = (-dl - a1) * ey + a1 * ec - ed
    eff = a1 * a1 * eyy - 2.0 * a1 * eyc + ecc
    effd = a1 * (-dl - a1) * eyy + (a1 * a1 + dl + a1) * eyc - a1 * eyd - a1 * ecc + ecd
    var = eff - ef * ef
    cov = effd - ef * efd
    floor = 1e-12 * eff.abs() + 1e-300
    s = torch.where(var > floor, cov / var.clamp_min(1e-300), torch.zeros_like(var))
    b = efd - s * ef
    return l, s, b


def _default_fd_step(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float64 else 1e-2


def _jvp(fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, how: str) -> tuple[Tensor, Tensor]:
    """``(fn(x), J v)`` by forward mode or the double-backward trick, or ``(fn(x), J^T v)``
    (``how="vjp"``: one reverse pass; ``v * J^T v`` has the same expectation as
    ``v * J v``, the diagonal, since ``diag(J^T) = diag(J)``)."""
    if how == "forward":
        res = torch.func.jvp(fn, (x,), (v,))
        return res[0], res[1]
    with torch.enable_grad():
        if how == "vjp":
            xx = x.detach().requires_grad_(True)
            out = fn(xx)
            (tangent,) = torch.autograd.grad(out, xx, v)
            return out.detach(), tangent
        out, tangent = torch.autograd.functional.jvp(fn, x, v)
    return out.detach(), tangent.detach()


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _run_key(parts: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _data_digest(data: Tensor) -> str:
    flat = data.detach().to(torch.float64).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(flat).hexdigest()[:32]


States = Literal["noised", "trajectory"]


class CheckpointError(ValueError):
    """An :func:`estimate_ems` checkpoint that this run cannot resume from: written by
    another run (other samples, schedule, grid or settings), or not a checkpoint file."""


class _Trajectories:
    """States of the model's own probability-flow ODE on the grid, per sample.

    The grid doubles as the integration grid: the data prediction the estimator takes at
    grid point ``j`` advances the state to ``j + 1`` with DPM-Solver++(3M) (exponential
    Adams-Bashforth of order 3, warm-up orders 1 and 2; no extra evaluation). ``x`` holds
    the states, ``h`` the predictions at the two previous grid points."""

    def __init__(self, start: Tensor) -> None:
        self.x = start.clone()
        self.h = torch.zeros(2, *start.shape, dtype=start.dtype, device=start.device)

    def advance(self, knots: Sequence[Knot], j: int, x0: Tensor, rows: slice) -> None:
        from .solvers.base import apply_update, dpmpp_update_coefficients

        back = min(2, j)
        nodes = [knots[j].lam, *(knots[j - 1 - i].lam for i in range(back))]
        coef = dpmpp_update_coefficients(knots[j], knots[j + 1], nodes, pseudo=False)
        x = self.x[rows]
        fs = [-x0.to(x.dtype), *(-self.h[i, rows] for i in range(back))]
        self.x[rows] = apply_update(coef, x, fs)
        self.h[1, rows] = self.h[0, rows]
        self.h[0, rows] = x0.to(x.dtype)


def estimate_ems(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    *,
    data: Tensor | None = None,
    noise: Tensor | None = None,
    prediction: str,
    guidance_scale: float,
    points: int = 200,
    lam_range: tuple[float, float] | None = None,
    batch_size: int = 64,
    probes: int = 1,
    chunk: int = 8,
    checkpoint: str | os.PathLike[str] | None = None,
    seed: int = 0,
    fd_step: float | None = None,
    jvp: Literal["forward", "double_backward", "vjp"] = "forward",
    progress: bool = False,
) -> EMS:
    """Estimate the EMS of a (guided) denoiser (App. C.1.1).

    Where the expectations are taken (give exactly one of ``data`` and ``noise``):

    - ``data``: clean samples of the model itself (or data), noised along the grid,
      ``x = alpha x0 + sigma z`` (the paper's recipe). For an unguided model whose
      denoiser is exact these are the ODE's marginals.
    - ``noise``: standard-normal noise that starts the model's own ODE at the grid's first
      point (``x = sigma noise``, as :func:`dpmsolver.sample` starts); the expectations are
      over the states of its trajectories, which the estimator integrates along the grid
      with the predictions it takes anyway (DPM-Solver++(3M), no extra evaluation). With
      guidance the ODE's marginals are not the noised samples' distribution, and only these
      states are distributed like the ones a sampler meets. Measured on the exact guided
      mixture (:mod:`dpmsolver.bench.v3_study`, (b)): at guidance 7.5 and 15, from 8 NFE
      on, v3 with statistics of noised own samples is less accurate than DPM-Solver++(2M)
      (12x at 7.5, 25 NFE); with trajectory statistics it is more accurate at every NFE.

    At each grid point ``lambda_j`` the estimator takes, per sample, ``x0_hat = D(x)`` and
    ``v * (grad_x D v)`` with one Jacobian-vector product per Rademacher probe ``v``, and
    ``dx0_hat/dlambda`` along the ODE by a central difference (two more evaluations). The
    same noise ``z`` and probes ``v`` serve every grid point (common random numbers,
    module docstring). ``l`` follows from the mean diagonal, ``s, b`` from the moments.

    The denoiser is always called with batches of exactly ``batch_size`` rows in sample
    order, so conditioning built for ``batch_size`` rows (labels, prompts of a guided
    denoiser) lines up with rows ``k * batch_size .. (k + 1) * batch_size - 1``.

    Memory: the sums for ``chunk`` grid points live on the samples' device; finished points
    go to the host (9 float64 values per point and dimension); trajectories keep three
    sample-sized tensors. With ``checkpoint`` the finished points (and trajectory states)
    are written there atomically after every chunk, and a rerun with the same arguments
    skips them; a checkpoint of another run raises a :class:`CheckpointError` (a
    ValueError). A NaN/Inf in the denoiser's outputs raises a FloatingPointError naming the
    grid points, before they reach the checkpoint.

    Args:
        denoiser: ``x0_hat = denoiser(x, knot)``, guidance included; differentiable in ``x``.
        schedule: the model's schedule.
        data: ``(N, *shape)`` clean samples (noised mode).
        noise: ``(N, *shape)`` standard-normal starting noise (trajectory mode).
        prediction: the network's parameterization (recorded in the fingerprint).
        guidance_scale: the guidance weight inside ``denoiser`` (recorded; 1 if none).
        points: grid points (default 200).
        lam_range: ``(lambda_min, lambda_max)`` (default: the schedule's ``t_max``..``t_min``).
        batch_size: rows per network call (default 64); must divide ``N``.
        probes: Rademacher probes per sample for the Jacobian diagonal (default 1).
        chunk: grid points per checkpoint (default 8).
        checkpoint: file for partial results (default None: no checkpointing).
        seed: seed of the noise ``z`` (noised mode) and the probes (default 0).
        fd_step: ``lambda`` step of the central difference (default 1e-3 for float64,
            1e-2 otherwise).
        jvp: how the probes meet the Jacobian: ``"forward"`` (``torch.func.jvp``, default),
            ``"double_backward"`` (``torch.autograd.functional.jvp``, for functions forward
            mode cannot trace) or ``"vjp"`` (one reverse pass, ``v * J^T v``: the same
            expectation; measured 2x cheaper than forward mode on the digits network, CPU).
        progress: show a progress bar on stderr.
    """
    if (data is None) == (noise is None):
        raise ValueError("give exactly one of data (noised samples) and noise (trajectories)")
    mode: States = "noised" if data is not None else "trajectory"
    base = data if data is not None else noise
    assert base is not None
    name = "data" if mode == "noised" else "noise"
    if not isinstance(base, Tensor) or not base.is_floating_point() or base.ndim < 1:
        raise TypeError(f"{name} must be a floating-point tensor of shape (N, *shape)")
    n = base.shape[0]
    bs = check_int("batch_size", batch_size, minimum=1)
    if n < bs or n % bs:
        raise ValueError(f"batch_size={bs} must divide the number of samples N={n} ({name})")
    m = check_int("points", points, minimum=4)
    check_int("probes", probes, minimum=1)
    ck = check_int("chunk", chunk, minimum=1)
    check_choice("jvp", jvp, ("forward", "double_backward", "vjp"))
    pred = str(prediction)
    w = check_finite_float("guidance_scale", guidance_scale)
    lo, hi = _grid_range(schedule, lam_range)
    lams = torch.linspace(lo, hi, m, dtype=torch.float64)
    if fd_step is None:
        step = _default_fd_step(base.dtype)
    else:
        step = check_finite_float("fd_step", fd_step, positive=True)
    fingerprint = EMSFingerprint(schedule_fingerprint(schedule), pred, w)
    shape = tuple(base.shape[1:])
    knots = [schedule.knot_at_lambda(float(lam)) for lam in lams]

    key = _run_key(
        dict(
            schedule=fingerprint.schedule,
            prediction=pred,
            guidance=w,
            points=m,
            lo=lo,
            hi=hi,
            batch_size=bs,
            probes=probes,
            seed=seed,
            fd_step=step,
            jvp=jvp,
            mode=mode,
            samples=_data_digest(base),
            shape=shape,
            dtype=str(base.dtype),
        )
    )
    sums = torch.zeros(m, len(_MOMENTS), *shape, dtype=torch.float64)
    done = torch.zeros(m, dtype=torch.bool)
    traj = _Trajectories(base * knots[0].sigma) if mode == "trajectory" else None
    if checkpoint is not None and os.path.exists(checkpoint):
        try:
            tensors, meta = _read_safetensors(checkpoint, "checkpoint")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if meta.get("format") != _CHECKPOINT_FORMAT or meta.get("run") != key:
            raise CheckpointError(
                f"checkpoint {os.fspath(checkpoint)!r} was written by another EMS run (other "
                "samples, schedule, grid or settings); delete it or pass another checkpoint path"
            )
        sums, done = tensors["sums"].to(torch.float64), tensors["done"].to(torch.bool)
        if traj is not None and bool(done.any()):
            traj.x = tensors["traj_x"].to(base.device, base.dtype)
            traj.h = tensors["traj_h"].to(base.device, base.dtype)

    gen = torch.Generator().manual_seed(seed)
    dev, dt = base.device, base.dtype
    z = torch.randn(base.shape, generator=gen, dtype=torch.float64).to(dev, dt)
    signs = torch.randint(0, 2, (probes, *base.shape), generator=gen).to(dev, dt) * 2 - 1
    todo = [j for j in range(m) if not bool(done[j])]
    bar = Progress(len(todo) * (n // bs), enabled=progress, desc="EMS")
    try:
        for start in range(0, len(todo), ck):
            block = todo[start : start + ck]
            acc = torch.zeros(len(block), len(_MOMENTS), *shape, dtype=torch.float64, device=dev)
            for k in range(0, n, bs):
                rows = slice(k, k + bs)
                for i, j in enumerate(block):
                    kn = knots[j]
                    if traj is None:
                        x = base[rows] * kn.alpha + z[rows] * kn.sigma
                    else:
                        x = traj.x[rows]
                    part, x0 = _point_sums(denoiser, schedule, kn, x, signs[:, rows], step, jvp)
                    acc[i] += part
                    if traj is not None and j + 1 < m:
                        traj.advance(knots, j, x0, rows)
                    bar.update()
            # A NaN/Inf in one sample would silently poison every statistic of the point
            # (and, through the trajectories, of every later one): stop before it is kept.
            if not bool(torch.isfinite(acc).all()):
                bad = [f"{float(lams[j]):.4g}" for i, j in enumerate(block) if not _finite(acc[i])]
                raise FloatingPointError(
                    f"estimate_ems: the denoiser's output went NaN/Inf at lambda = "
                    f"{', '.join(bad)} (grid points finished before them are kept in the "
                    "checkpoint, if any)"
                )
            sums[block] = acc.cpu()
            done[block] = True
            if checkpoint is not None:
                _write_checkpoint(checkpoint, sums, done, key, traj)
    finally:
        bar.close()
    alphas = [k.alpha for k in knots]
    l_, s_, b_ = _finalize(sums, n, lams, alphas)
    return EMS(lams, l_, s_, b_, fingerprint, samples=n, source="estimated")


def _point_sums(
    den: Denoiser,
    schedule: NoiseSchedule,
    knot: Knot,
    x: Tensor,
    vb: Tensor,
    step: float,
    how: str,
) -> tuple[Tensor, Tensor]:
    """The nine per-dimension sums of one batch at one grid point (``_MOMENTS`` order) and
    the data prediction ``x0_hat`` there."""

    def fn(xx: Tensor) -> Tensor:
        return den(xx, knot)

    diag = torch.zeros_like(x, dtype=torch.float64)
    pred: Tensor | None = None
    for v in vb:
        with torch.no_grad():
            out, jv = _jvp(fn, x, v, how)
        pred = out if pred is None else pred
        diag += (v * jv).to(torch.float64)
    assert pred is not None
    diag /= vb.shape[0]
    y = x / knot.alpha
    tangent = pred - y
    kp = schedule.knot_at_lambda(knot.lam + step)
    km = schedule.knot_at_lambda(knot.lam - step)
    with torch.no_grad():
        dp = den((y + step * tangent) * kp.alpha, kp)
        dm = den((y - step * tangent) * km.alpha, km)
    d = ((dp - dm) / (2.0 * step)).to(torch.float64)
    y64, c = y.to(torch.float64), pred.detach().to(torch.float64)
    parts = (diag, y64, c, d, y64 * y64, y64 * c, y64 * d, c * c, c * d)
    return torch.stack([p.sum(0) for p in parts]), pred.detach()


def _write_checkpoint(
    path: str | os.PathLike[str], sums: Tensor, done: Tensor, key: str, traj: _Trajectories | None
) -> None:
    st = _safetensors()
    from .io import atomic_write

    meta = {"format": _CHECKPOINT_FORMAT, "format_version": str(FORMAT_VERSION), "run": key}
    tensors = {"sums": sums.contiguous(), "done": done.to(torch.uint8).contiguous()}
    if traj is not None:
        tensors["traj_x"] = traj.x.detach().cpu().contiguous()
        tensors["traj_h"] = traj.h.detach().cpu().contiguous()
    atomic_write(path, lambda tmp: st.save_file(tensors, tmp, metadata=meta))


#: :func:`estimate_model_ems`'s (and ``dpmsolver ems``'s) default sample count and grid;
#: chosen by measurement on the built-in model (:mod:`dpmsolver.cli.ems`).
MODEL_EMS_SAMPLES = 256
MODEL_EMS_POINTS = 100


def estimate_model_ems(
    model: LoadedModel,
    *,
    guidance: float,
    samples: int = MODEL_EMS_SAMPLES,
    points: int = MODEL_EMS_POINTS,
    batch_size: int = 64,
    probes: int = 1,
    seed: int = 0,
    jvp: Literal["forward", "double_backward", "vjp"] = "vjp",
    checkpoint: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    network: Callable[..., Tensor] | None = None,
    progress: bool = False,
) -> EMS:
    """The EMS of a loaded model over its own sampling trajectories (:func:`estimate_ems`
    with ``noise=``), at classifier-free guidance ``guidance``, as
    :func:`dpmsolver.model.sample_indices` samples it.

    Sample ``i`` starts from the same seeded standard normal noise as sample ``i`` of a
    sampling run with ``seed`` (:func:`dpmsolver.noise.sample_seeds`,
    :func:`~dpmsolver.noise.seeded_randn`; float32). A class-conditional model takes the
    labels ``0, 1, .., C - 1, 0, ..`` cycling within each batch, so every class is in every
    network call. Trajectory statistics, because with guidance the ODE's states are not
    distributed like noised data (``benchmarks/v3_study.md``, (b)).

    Args:
        model: the model (:class:`dpmsolver.model.LoadedModel`), on ``device``.
        guidance: classifier-free guidance scale (1 = none; other values need a
            class-conditional model with a null label).
        samples: trajectories (default :data:`MODEL_EMS_SAMPLES`); a multiple of
            ``batch_size`` when larger than it.
        points: grid points, uniform in half log-SNR over the schedule's range (default
            :data:`MODEL_EMS_POINTS`).
        batch_size: samples per network call (default 64; at most ``samples``).
        probes: Rademacher probes per sample for the Jacobian diagonal (default 1).
        seed: sampling seed of the noises, also seeds the probes (default 0).
        jvp: how the probes meet the Jacobian (default ``"vjp"``: one reverse pass, measured
            2x cheaper than forward mode on the built-in model; :func:`estimate_ems`).
        checkpoint: file for partial results; a rerun with the same arguments resumes there.
        device: where the noise and the statistics' sums live (the model's device).
        network: call this instead of ``model.network`` (e.g. a wrapper that counts calls).
        progress: show a progress bar on stderr.
    """
    from .model import LoadedModel
    from .noise import sample_seeds, seeded_randn
    from .sampling import build_denoiser

    if not isinstance(model, LoadedModel):
        raise TypeError(f"model must be a LoadedModel, got {type(model).__name__}")
    n = check_int("samples", samples, minimum=1)
    bs = min(check_int("batch_size", batch_size, minimum=1), n)
    if n % bs:
        raise ValueError(
            f"samples={n} must be a multiple of batch_size={bs} (the statistics' denoiser is "
            "called with whole batches whose labels cycle over the classes)"
        )
    w = check_finite_float("guidance", guidance)
    dev = torch.device(device)
    labels = None
    if model.num_classes is not None:
        labels = torch.arange(bs, device=dev) % model.num_classes
    kwargs: dict[str, Any] = model.conditioning(labels, w)
    den = build_denoiser(
        network if network is not None else model.network,
        model.prediction,
        **kwargs,
    )
    noise = seeded_randn(sample_seeds(seed, range(n)), model.shape, device=dev)
    return estimate_ems(
        den,
        model.schedule,
        noise=noise,
        prediction=str(model.prediction),
        guidance_scale=w,
        points=points,
        batch_size=bs,
        probes=probes,
        checkpoint=checkpoint,
        seed=seed,
        jvp=jvp,
        progress=progress,
    )


# ----------------------------------------------------------------------------------------
# Exact statistics of the analytic Gaussian mixtures
# ----------------------------------------------------------------------------------------


def _alpha_sigma_fn(schedule: NoiseSchedule) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``lambda -> (alpha, sigma)`` as differentiable torch functions for the library's
    schedule families (VP: ``alpha^2 + sigma^2 = 1``; VE: ``alpha = 1``; flow:
    ``alpha + sigma = 1``)."""
    base = _unwrap(schedule)
    if isinstance(base, (DiscreteVPSchedule, ContinuousVPSchedule)):

        def vp(lam: Tensor) -> tuple[Tensor, Tensor]:
            sp = torch.nn.functional.softplus
            return torch.exp(-0.5 * sp(-2.0 * lam)), torch.exp(-0.5 * sp(2.0 * lam))

        return vp
    if isinstance(base, VESchedule):
        return lambda lam: (torch.ones_like(lam), torch.exp(-lam))
    if isinstance(base, RectifiedFlowSchedule):
        return lambda lam: (torch.sigmoid(lam), torch.sigmoid(-lam))
    raise ValueError(f"mixture_ems supports VP, VE and flow schedules, got {type(base).__name__}")


def _mixture_terms(
    mix: GaussianMixture, xf: Tensor, alpha: Tensor, sigma: Tensor, y: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Posterior mean and the diagonal of its Jacobian, ``(B, D)`` each (closed form)."""
    mu, s2 = mix.means.to(xf), mix.stds.to(xf) ** 2
    a = alpha.view(-1, 1, 1)
    var = a * a * s2 + (sigma * sigma).view(-1, 1, 1)  # (B, K, D)
    diff = xf[:, None, :] - a * mu
    quad = (diff * diff / var) + torch.log(2 * math.pi * var)
    logp = torch.log(mix.weights.to(xf)) - 0.5 * quad.sum(-1)
    if y is not None:
        yy = y.to(xf.device).view(-1, 1)
        allowed = (mix.labels.to(xf.device).view(1, -1) == yy) | (yy == mix.num_classes)
        logp = logp.masked_fill(~allowed, -math.inf)
    w = torch.exp(logp - logp.amax(dim=1, keepdim=True))
    w = w / w.sum(dim=1, keepdim=True)  # (B, K)
    post = mu + a * s2 / var * diff  # (B, K, D)
    mean = (w[:, :, None] * post).sum(1)
    # d post_k/dx = a s_k^2/var_k;  d log p_k/dx = -diff_k/var_k;  dw_k/dx = w_k (g_k - g_bar)
    g = -diff / var
    g_bar = (w[:, :, None] * g).sum(1)
    diag = (w[:, :, None] * (a * s2 / var + g * post)).sum(1) - g_bar * mean
    return mean, diag


def mixture_x0_and_diag(
    mixture: GaussianMixture,
    x: Tensor,
    alpha: Tensor | float,
    sigma: Tensor | float,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """The exact (guided) denoiser of a mixture and the diagonal of its Jacobian in ``x``:
    ``D = D_u + w (D_c - D_u)`` as :class:`~dpmsolver.analytic.MixtureDenoiser` defines it,
    both ``(B, D)`` float64 (``alpha``, ``sigma``: floats or ``(B,)`` tensors)."""
    b = x.shape[0]
    xf = x.reshape(b, -1).to(torch.float64)
    al = torch.as_tensor(alpha, dtype=torch.float64, device=xf.device).expand(b)
    sg = torch.as_tensor(sigma, dtype=torch.float64, device=xf.device).expand(b)
    cond, dcond = _mixture_terms(mixture, xf, al, sg, y)
    if y is None or guidance_scale == 1.0:
        return cond, dcond
    unc, dunc = _mixture_terms(mixture, xf, al, sg, None)
    w = float(guidance_scale)
    return unc + w * (cond - unc), dunc + w * (dcond - dunc)


def mixture_ems(
    mixture: GaussianMixture,
    schedule: NoiseSchedule,
    *,
    guidance_scale: float = 1.0,
    conditional: bool | None = None,
    states: States = "noised",
    prediction: str = "eps",
    points: int = 200,
    lam_range: tuple[float, float] | None = None,
    samples: int = 16384,
    batch_size: int = 4096,
    substeps: int = 4,
    seed: int = 0,
) -> EMS:
    """The EMS of an exact mixture denoiser, computed without probes or differences.

    The denoiser is :class:`~dpmsolver.analytic.MixtureDenoiser` with labels cycling over
    the classes (``y_i = i mod C``, as :func:`dpmsolver.bench.accuracy.mixture_problem`
    builds it) when ``conditional`` (default: when ``guidance_scale != 1``), else the
    unconditional one. The expectation is over (as :func:`estimate_ems`):

    - ``states="noised"``: exact samples ``x0`` of each row's class noised along the grid
      with common noise ``z``;
    - ``states="trajectory"``: the guided ODE's own states, started at ``sigma z`` on the
      grid's first point and integrated with DPM-Solver++(3M) on ``substeps`` sub-steps per
      grid interval (local errors far below the Monte Carlo error).

    Per sample the Jacobian diagonal is closed form (:func:`mixture_x0_and_diag`) and
    ``dx0_hat/dlambda`` is exact forward-mode AD through ``alpha(lambda), sigma(lambda)``;
    the only error left is the Monte Carlo average over ``samples`` points (its standard
    error is ``O(samples^-1/2)``, below the estimator's at the same count, which adds probe
    and difference noise).

    Args:
        mixture: the data distribution.
        schedule: a VP, VE or flow schedule of the library.
        guidance_scale: classifier-free guidance weight ``w`` (default 1).
        conditional: use the class-conditional denoiser (default: ``guidance_scale != 1``).
        states: ``"noised"`` (default) or ``"trajectory"``.
        prediction: recorded in the fingerprint (the mixture network's, default ``"eps"``).
        points, lam_range: the grid (as :func:`estimate_ems`).
        samples: Monte Carlo samples (default 16384).
        batch_size: rows per evaluation (default 4096).
        substeps: integration steps per grid interval in trajectory mode (default 4).
        seed: seed of the samples and noise.
    """
    from .solvers.base import apply_update, dpmpp_update_coefficients

    w = check_finite_float("guidance_scale", guidance_scale)
    cond = (w != 1.0) if conditional is None else bool(conditional)
    check_choice("states", states, ("noised", "trajectory"))
    n = check_int("samples", samples, minimum=1)
    bs = min(check_int("batch_size", batch_size, minimum=1), n)
    m = check_int("points", points, minimum=4)
    sub = check_int("substeps", substeps, minimum=1)
    lo, hi = _grid_range(schedule, lam_range)
    lams = torch.linspace(lo, hi, m, dtype=torch.float64)
    alpha_sigma = _alpha_sigma_fn(schedule)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % mixture.num_classes if cond else None
    x0 = mixture.sample(n, generator=gen, y=labels).reshape(n, -1)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    sums = torch.zeros(m, len(_MOMENTS), mixture.dim, dtype=torch.float64)
    fine = torch.linspace(lo, hi, (m - 1) * sub + 1, dtype=torch.float64)
    fine_knots = [schedule.knot_at_lambda(float(v)) for v in fine]

    def scales(lam: Tensor) -> tuple[float, float]:
        al, sg = alpha_sigma(lam.reshape(1))
        return float(al), float(sg)

    alphas = [scales(v)[0] for v in lams]
    for k in range(0, n, bs):
        rows = slice(k, k + bs)
        yb = None if labels is None else labels[rows]
        hist: list[tuple[float, Tensor]] = []
        x = z[rows] * scales(lams[0])[1]
        for i, kn in enumerate(fine_knots):
            lam = fine[i]
            al, sg = scales(lam)
            if states == "noised":
                if i % sub:
                    continue
                x = al * x0[rows] + sg * z[rows]
            pred, diag = mixture_x0_and_diag(mixture, x, al, sg, yb, w)
            if i % sub == 0:
                yv = x / al
                lam_t = lam.reshape(1)

                def psi(yy: Tensor, ll: Tensor, yb: Tensor | None = yb) -> Tensor:
                    a_, s_ = alpha_sigma(ll)
                    a_b, s_b = a_.expand(yy.shape[0]), s_.expand(yy.shape[0])
                    return mixture_x0_and_diag(mixture, yy * a_b.view(-1, 1), a_b, s_b, yb, w)[0]

                d = torch.func.jvp(psi, (yv, lam_t), (pred - yv, torch.ones_like(lam_t)))[1]
                parts = (diag, yv, pred, d, yv * yv, yv * pred, yv * d, pred * pred, pred * d)
                sums[i // sub] += torch.stack([p.sum(0) for p in parts])
            if states == "trajectory" and i + 1 < len(fine_knots):
                nodes = [kn.lam, *(h[0] for h in hist[:2])]
                coef = dpmpp_update_coefficients(kn, fine_knots[i + 1], nodes, pseudo=False)
                x = apply_update(coef, x, [-pred, *(-h[1] for h in hist[:2])])
                hist = [(kn.lam, pred), *hist][:2]
    l_, s_, b_ = _finalize(sums, n, lams, alphas)
    shape = mixture.shape
    fp = EMSFingerprint(schedule_fingerprint(schedule), prediction, w)
    return EMS(
        lams,
        l_.reshape(m, *shape),
        s_.reshape(m, *shape),
        b_.reshape(m, *shape),
        fp,
        samples=0,
        source="exact",
    )
