"""DPM-Solver-v3: multistep predictor-corrector on the EMS-reformulated ODE.

Zheng, Lu, Chen, Zhu 2023 (NeurIPS, arXiv 2310.13268), Sec. 3.1 (reformulated exact
solution), Sec. 3.3 (local approximation, Eq. 8; multistep predictor-corrector, Fig. 2) and
its techniques for few steps and large guidance (pseudo-order solvers, half-corrector).
The statistics ``l, s, b`` and their meaning are in :mod:`dpmsolver.ems`.

Exact solution (Sec. 3.1). With ``y = x/alpha``, ``f = (1 - l) y - x0_hat`` (the official
code's ``f = (sigma eps - l x)/alpha``), ``u(lambda) = Int_{lambda_s}^{lambda} l``,
``v(lambda) = Int_{lambda_s}^{lambda} s`` and ``g`` as in :mod:`dpmsolver.ems`,
``f(lambda) = e^{v} [g(lambda) + W(lambda)]`` with ``W(lambda) = Int_{lambda_s}^{lambda}
e^{-v} b``, and ``dy/dlambda = -l y - f`` integrates to

    x_t = (alpha_t/alpha_s) e^{-u_t} x_s
          - alpha_t e^{-u_t} [ Int e^{u+v} g dlambda + Int e^{u+v} W dlambda ].

(n+1)-th order local approximation (Eq. 8): ``g`` is replaced by the polynomial through
its values at ``n + 1`` points (``g_i = e^{-(S_i - S_s)} f_i - Int_{lambda_s}^{lambda_i}
e^{-(S_r - S_s)} b_r dr`` maps each stored ``f_i`` to the step's origin), so with
``tau = (lambda - lambda_s)/(lambda_t - lambda_s)``, moments
``M_k = Int_{lambda_s}^{lambda_t} e^{u+v} tau^k dlambda`` and interpolation weights
``w_i = sum_k W_ik M_k``:

    x_t = c_x x_s + sum_i c_i f_i + c_0,
    c_x = (alpha_t/alpha_s) e^{-u_t},   c_i = -alpha_t e^{-u_t} w_i e^{-(S_i - S_s)},
    c_0 = alpha_t e^{-u_t} (sum_i w_i beta_i - K),   K = Int e^{u+v} W dlambda.

These are the official code's ``a`` (``exp(L_s - L_t) alpha_t/alpha_s``), ``b`` (the
``I``- and high-order ``exp_coeffs`` integrals) and ``c`` (the ``C``, ``B`` terms). The
official code evaluates them with the trapezoidal rule on the statistics grid and snaps
every step to a grid point; here the statistics are natural cubic splines in ``lambda``,
``Int l`` and ``Int s`` are exact and the rest is Gauss-Legendre quadrature (4 nodes per
grid interval the step overlaps, nested for ``W``), so steps may end anywhere and the
coefficients are exact for the interpolated statistics. That is what lets the measured
convergence order reach the claimed one (a trapezoidal rule on a fixed grid would leave an
O(grid^2) floor).

Derivative estimates: ``W_ik`` are the monomial coefficients of the Lagrange basis (the
official ``compute_high_order_derivatives`` with ``pseudo=False``: an exact interpolating
polynomial), or, for the *pseudo-order* variant, Newton divided differences taken as Taylor
coefficients, ``g^(k)(lambda_s) ~ k! g[lambda_0, ..., lambda_k]`` (``pseudo=True``), which
is exact only for the first derivative: a pseudo-order method of order ``p >= 3`` converges
with order 2 (measured, tests/test_order.py).

Multistep predictor-corrector (Fig. 2, after UniPC). Step ``i`` from ``s`` to ``t`` first
corrects the incoming state at ``s`` with the evaluation just made there (no extra
evaluation; the stored remainder ``f_s`` is kept, the official code's ``N_old``), redoing
the previous step from ``x_prev`` with the new point among the interpolation nodes, then
predicts from the corrected state. Correctors (the official ``c_pseudo``):

- ``"pseudo"`` (``c_pseudo=True``): ``p + 1`` nodes (new point, previous point, ``p - 1``
  older), pseudo-order derivatives; converges with order 2 for every ``p``.
- ``"same"`` (``c_pseudo=False``): ``p`` nodes, exact interpolation; order ``p``. After a
  first-order step (``p = 1``) the official code skips the correction; we use two nodes
  there, otherwise that step's O(h^2) error caps the order at 2 (measured: 80..640 steps,
  order 3, local slopes 3.6, 3.8, 2.8, 2.3 without, 3.6, 3.8, 3.3, 3.1 with).
- ``"full"`` (ours, UniC-like): ``p + 1`` nodes, exact interpolation; order ``p + 1``.

``p`` is the previous predictor step's order. ``half_corrector`` corrects only points in
the noisier half of the schedule's time range: the official code tests ``t > 0.5`` on the
point being corrected; its README says the corrector is used "in the time region
t <= 0.5". The two disagree; we follow the code (which produced the released settings).

Without statistics (``ems=None``: ``l = 1, s = b = 0``, the official ``degenerated=True``)
the coefficients are DPM-Solver++'s in closed form (:func:`~.base.exponential_moments`): the
predictor equals ``dpmpp_multistep`` (order 2: ``variant="heun"``, order 3: the Taylor 3M)
to rounding.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._validate import check_choice, check_finite_float, check_int
from ..ems import EMS, EMSSpline, host_to_device
from ..schedules import Knot, NoiseSchedule
from .base import (
    Form,
    StepContext,
    UpdateCoefficients,
    apply_update,
    dpmpp_update_coefficients,
    first_order_step,
    interpolation_matrix,
)
from .registry import SolverInfo, register
from .shapes import MultistepSolver, history_order

__all__ = [
    "DPMSolverV3",
    "IntervalIntegrals",
    "UpdateCoefficients",
    "V3State",
    "apply_update",
    "interpolation_matrix",
    "interval_integrals",
    "recommended_options",
    "remainder",
    "sample_v3",
    "transfer",
    "update_coefficients",
]

Corrector = Literal["auto", "off", "same", "pseudo", "full"]
_GL_X, _GL_W = (list(map(float, a)) for a in np.polynomial.legendre.leggauss(4))
_MAX_PIECE = 0.25

# ----------------------------------------------------------------------------------------
# Coefficient math: pure functions of host floats and the statistics' spline tables
# ----------------------------------------------------------------------------------------


def remainder(spline: EMSSpline | None, knot: Knot, x: Tensor, x0: Tensor) -> Tensor:
    """``f = (1 - l) x/alpha - x0_hat`` at ``knot`` (Sec. 3.1's ``N_theta / alpha``);
    ``-x0_hat`` without statistics (``l = 1``)."""
    if spline is None:
        return -x0
    (l_val, *_), _ = spline.at([knot.lam])
    one_minus_l = (1.0 - l_val[0]).to(x.dtype)
    return one_minus_l * (x / knot.alpha) - x0


def _pieces(spline: EMSSpline, a: float, c: float) -> list[tuple[float, float]]:
    """``[a, c]`` (either direction) cut at the grid points inside it, and further into
    pieces no longer than ``_MAX_PIECE`` (4-node Gauss-Legendre is then exact to rounding
    for the smooth integrands here: its error is ``5.6e-10 L^9 max|f^(8)|``)."""
    lo, hi = min(a, c), max(a, c)
    first = math.floor((lo - spline.lam0) / spline.delta) + 1
    last = math.ceil((hi - spline.lam0) / spline.delta) - 1
    inner = [spline.lam0 + j * spline.delta for j in range(first, last + 1)]
    inner = [p for p in inner if lo < p < hi]
    pts = [a, *(inner if c > a else inner[::-1]), c]
    out = []
    for p, q in itertools.pairwise(pts):
        if p == q:
            continue
        cuts = max(1, math.ceil(abs(q - p) / _MAX_PIECE))
        edges = [p + (q - p) * i / cuts for i in range(cuts)] + [q]
        out += list(itertools.pairwise(edges))
    return out


def _gauss(p: float, q: float) -> tuple[list[float], list[float]]:
    half = (q - p) / 2
    return [p + half * (1 + x) for x in _GL_X], [half * w for w in _GL_W]


def _column(values: Sequence[float], like: Tensor) -> Tensor:
    """Host floats as a ``(P, 1, ..., 1)`` tensor broadcasting against ``like[0]`` (copied
    without a host-device synchronisation, :func:`~dpmsolver.ems.host_to_device`)."""
    t = host_to_device(values, like.dtype, like.device)
    return t.view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class IntervalIntegrals:
    """Integrals over one step ``[a, c]`` (per dimension, on the spline's device).

    Attributes:
        u: ``Int_a^c l``;  v: ``Int_a^c s``.
        moments: ``M_k = Int_a^c e^{u+v} tau^k dlambda``, ``tau = (lambda - a)/(c - a)``.
        bias: ``K = Int_a^c e^{u(lambda)+v(lambda)} W(lambda) dlambda``.
        w_end: ``W(c) = Int_a^c e^{-v} b``.
    """

    u: Tensor
    v: Tensor
    moments: list[Tensor]
    bias: Tensor
    w_end: Tensor


def interval_integrals(spline: EMSSpline, a: float, c: float, n_moments: int) -> IntervalIntegrals:
    """The step integrals of the module docstring by Gauss-Legendre quadrature on each grid
    interval ``[a, c]`` overlaps (``W`` at the nodes by a nested rule from each piece's
    start); ``Int l``, ``Int s`` are the splines' exact antiderivatives."""
    pieces = _pieces(spline, a, c)
    g = len(_GL_X)
    nodes: list[float] = []
    weights: list[float] = []
    sub: list[float] = []
    sub_w: list[float] = []
    for p, q in pieces:
        xs, ws = _gauss(p, q)
        nodes += xs
        weights += ws
        for node in xs:
            ys, vs = _gauss(p, node)
            sub += ys
            sub_w += vs
    n = len(nodes)
    values, integrals = spline.at([a, c, *nodes, *sub])
    big_l, big_s = integrals[0], integrals[1]
    u = big_l[2 : 2 + n] - big_l[0]
    v = big_s[2 : 2 + n] - big_s[0]
    wq = _column(weights, u)
    we = wq * torch.exp(u + v)
    tau = _column([(lam - a) / (c - a) for lam in nodes], u)
    moments = []
    power = torch.ones_like(tau)
    for _ in range(n_moments):
        moments.append((we * power).sum(0))
        power = power * tau
    # W(lambda) = Int_a^lambda e^{-v} b: whole pieces, then from each piece start to a node.
    integrand = torch.exp(-v) * values[2, 2 : 2 + n]
    full = (wq * integrand).reshape(len(pieces), g, *u.shape[1:]).sum(1)
    before = full.cumsum(0) - full
    v_sub = big_s[2 + n :] - big_s[0]
    partial = _column(sub_w, u) * torch.exp(-v_sub) * values[2, 2 + n :]
    partial = partial.reshape(n, g, *u.shape[1:]).sum(1)
    w_nodes = before.repeat_interleave(g, dim=0) + partial
    return IntervalIntegrals(
        u=big_l[1] - big_l[0],
        v=big_s[1] - big_s[0],
        moments=moments,
        bias=(we * w_nodes).sum(0),
        w_end=full.sum(0),
    )


def transfer(spline: EMSSpline, a: float, lam: float) -> tuple[Tensor, Tensor]:
    """``(S(lam) - S(a), Int_a^lam e^{-(S_r - S_a)} b_r dr)``: what maps a remainder ``f``
    stored at ``lam`` to ``g`` at origin ``a``: ``g = e^{-(S(lam) - S(a))} f - beta``."""
    nodes: list[float] = []
    weights: list[float] = []
    for p, q in _pieces(spline, a, lam):
        xs, ws = _gauss(p, q)
        nodes += xs
        weights += ws
    values, integrals = spline.at([a, lam, *nodes])
    big_s = integrals[1]
    v_nodes = big_s[2:] - big_s[0]
    beta = (_column(weights, v_nodes) * torch.exp(-v_nodes) * values[2, 2:]).sum(0)
    return big_s[1] - big_s[0], beta


def update_coefficients(
    spline: EMSSpline | None, a: Knot, c: Knot, nodes: Sequence[float], pseudo: bool
) -> UpdateCoefficients:
    """Coefficients of the local approximation (Eq. 8) from ``a`` to ``c`` with
    interpolation nodes ``nodes`` (half log-SNRs; ``nodes[0] = a.lam``; ``c.lam`` may be
    one of them, as in the corrector)."""
    if spline is None:  # l = 1, s = b = 0: DPM-Solver++ in closed form
        return dpmpp_update_coefficients(a, c, nodes, pseudo)
    h = c.lam - a.lam
    mat = interpolation_matrix([(lam - a.lam) / h for lam in nodes], pseudo)
    n = len(nodes)
    cf: list[float | Tensor] = []
    ints = interval_integrals(spline, a.lam, c.lam, n)
    decay = torch.exp(-ints.u)
    scale = c.alpha * decay
    shift = -ints.bias
    for i, lam in enumerate(nodes):
        w_i = sum((mat[i][k] * ints.moments[k] for k in range(n)), torch.zeros_like(decay))
        if i == 0:
            e_i, beta_i = torch.ones_like(decay), torch.zeros_like(decay)
        elif lam == c.lam:
            e_i, beta_i = torch.exp(-ints.v), ints.w_end
        else:
            dv, beta_i = transfer(spline, a.lam, lam)
            e_i = torch.exp(-dv)
        cf.append(-scale * w_i * e_i)
        shift = shift + w_i * beta_i
    return UpdateCoefficients((c.alpha / a.alpha) * decay, cf, scale * shift)


#: Steps whose coefficients one EMS object keeps (:func:`_cached_coefficients`).
COEFFICIENT_CACHE = 4096
_CACHE_LOCK = threading.Lock()  # tune runs budgets in threads


def _cached_coefficients(
    ems: EMS | None,
    spline: EMSSpline | None,
    a: Knot,
    c: Knot,
    nodes: Sequence[float],
    pseudo: bool,
) -> UpdateCoefficients:
    """:func:`update_coefficients`, remembered per EMS object: they depend only on the
    step's knots and nodes, and a sampler run with the same knots (every run of a recipe;
    ``dpmsolver.tune`` runs one recipe hundreds of times) would integrate the statistics
    again at every step. At most :data:`COEFFICIENT_CACHE` steps are kept (the oldest
    forgotten first)."""
    if ems is None or spline is None:
        return update_coefficients(spline, a, c, nodes, pseudo)
    cache = ems.__dict__.setdefault("_coefficients", {})  # a cache, not a field
    key = (str(spline.coef.device), a.lam, a.alpha, c.lam, c.alpha, tuple(nodes), pseudo)
    with _CACHE_LOCK:
        coef = cache.get(key)
    if coef is None:
        coef = update_coefficients(spline, a, c, nodes, pseudo)
        with _CACHE_LOCK:
            if len(cache) >= COEFFICIENT_CACHE:
                cache.pop(next(iter(cache)))
            cache[key] = coef
    return coef


# ----------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class V3State:
    """History of a DPM-Solver-v3 run.

    Attributes:
        knots: starts of the last steps (newest first).
        fs: the remainders ``f`` there (computed at the uncorrected states, kept when the
            state is corrected: the official ``N_old``).
        x_prev: the (corrected) state the last predictor started from, at ``knots[0]``.
        prev_order: order of the last predictor step (the next corrector's ``p``).
        spline: the statistics' splines on the state's device (built at the first step).
    """

    knots: tuple[Knot, ...] = ()
    fs: tuple[Tensor, ...] = ()
    x_prev: Tensor | None = None
    prev_order: int = 0
    spline: EMSSpline | None = None


def _table_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True)
class DPMSolverV3(MultistepSolver):
    """DPM-Solver-v3 (multistep predictor of order 1-3 with an optional corrector).

    Its history is of remainders ``f`` (module docstring), not of one of the two
    predictions, and its corrector redoes the last step, so it replaces the multistep
    skeleton's :meth:`step` (it keeps the shape's cost and plan).

    Args:
        order: predictor order ``p``: 1, 2 (default; the paper's choice for guided
            sampling) or 3 (its choice for unconditional sampling).
        ems: the model's statistics (:class:`~dpmsolver.ems.EMS`); None (default) means
            ``l = 1, s = b = 0``, i.e. DPM-Solver++ with v3's corrector.
        corrector: ``"auto"`` (default: off when the statistics were computed at guidance
            scale >= 5, as the official Stable Diffusion script does, else ``"pseudo"``),
            ``"off"``, ``"pseudo"`` (official ``c_pseudo=True``), ``"same"``
            (``c_pseudo=False``) or ``"full"`` (module docstring).
        pseudo_order: pseudo-order predictor (official ``p_pseudo``; default False).
        half_corrector: correct only in the noisier half of the time range (official
            ``half``; default False).
    """

    order: int = 2
    ems: EMS | None = None
    corrector: Corrector = "auto"
    pseudo_order: bool = False
    half_corrector: bool = False

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3))
        if self.ems is not None and not isinstance(self.ems, EMS):
            got = type(self.ems).__name__
            raise TypeError(f"ems must be a dpmsolver.ems.EMS or None, got {got}")
        check_choice("corrector", self.corrector, ("auto", "off", "same", "pseudo", "full"))
        check_choice("pseudo_order", self.pseudo_order, (True, False))
        check_choice("half_corrector", self.half_corrector, (True, False))

    @property
    def scalar_coefficients(self) -> bool:
        return self.ems is None  # the statistics make the coefficients per dimension

    @property
    def corrector_mode(self) -> Literal["off", "same", "pseudo", "full"]:
        """The corrector in use (``"auto"`` resolved against the statistics' guidance scale)."""
        if self.corrector != "auto":
            return self.corrector
        w = None if self.ems is None else self.ems.guidance_scale
        return "off" if (w is not None and w >= 5.0) else "pseudo"

    @property
    def claimed_order(self) -> float:
        p = min(self.order, 2) if self.pseudo_order else self.order
        mode = self.corrector_mode
        if mode == "off":
            return float(p)
        q = {"same": max(self.order, 2), "pseudo": 2, "full": self.order + 1}[mode]
        with_corrector = min(q, p + 1)
        return float(min(with_corrector, p) if self.half_corrector else with_corrector)

    def init_state(self) -> Any:
        return V3State()

    def _prepare(self, ctx: StepContext, x: Tensor, state: V3State) -> EMSSpline | None:
        if self.ems is None or state.spline is not None:
            return state.spline
        self.ems.check(schedule=ctx.schedule)
        if self.ems.shape not in ((), tuple(x.shape[1:])):
            raise ValueError(
                f"ems describes samples of shape {self.ems.shape} but the state has per-sample "
                f"shape {tuple(x.shape[1:])}"
            )
        return self.ems.spline(x.device, _table_dtype(x.device))

    def _corrects(self, knot: Knot, schedule: NoiseSchedule) -> bool:
        if not self.half_corrector:
            return True
        span = schedule.t_max - schedule.t_min
        return span > 0 and (knot.t - schedule.t_min) / span > 0.5

    def step(  # type: ignore[override]  # a remainder history, not MultistepState
        self, ctx: StepContext, x: Tensor, x0: Tensor, state: V3State
    ) -> tuple[Tensor, V3State]:
        s, t = ctx.s, ctx.t
        spline = self._prepare(ctx, x, state)
        keep = self.order
        if not math.isfinite(s.lam):  # out of pure noise: the statistics end before it
            x_t = first_order_step(Form.DATA, x, x0, x0, s, t)
            return x_t, V3State(
                (s, *state.knots)[:keep], (torch.zeros_like(x0), *state.fs)[:keep], None, 1, spline
            )
        if self.ems is not None:
            try:
                self.ems.check_covers(s.lam, t.lam)
            except ValueError as e:
                where = f"dpmv3 step {ctx.index} (t={s.t:.6g} -> {t.t:.6g})"
                raise ValueError(f"{where}: {e}") from None
        f_s = remainder(spline, s, x, x0)

        # Corrector: redo the previous step with the new point among the nodes.
        mode = self.corrector_mode
        if (
            mode != "off"
            and state.x_prev is not None
            and math.isfinite(state.knots[0].lam)
            and self._corrects(s, ctx.schedule)
        ):
            p = state.prev_order
            # "same": p nodes, but at least two (the official code skips the correction
            # after a first-order step; we correct it, so the start does not cap the order).
            extra = max(p - 2, 0) if mode == "same" else p - 1
            a = state.knots[0]
            nodes = [a.lam, s.lam, *(k.lam for k in state.knots[1 : 1 + extra])]
            fs = [state.fs[0], f_s, *state.fs[1 : 1 + extra]]
            coef = _cached_coefficients(self.ems, spline, a, s, nodes, mode == "pseudo")
            x = apply_update(coef, state.x_prev, fs)

        # Predictor of order k (warm-up: capped by the history).
        k = history_order(ctx.order, s, [kn.lam for kn in state.knots])
        if k == 1 and spline is None:
            x_t = first_order_step(Form.DATA, x, x0, -f_s, s, t)
        else:
            nodes = [s.lam, *(kn.lam for kn in state.knots[: k - 1])]
            coef = _cached_coefficients(self.ems, spline, s, t, nodes, self.pseudo_order)
            x_t = apply_update(coef, x, [f_s, *state.fs[: k - 1]])
        new_state = V3State(
            knots=(s, *state.knots)[:keep],
            fs=(f_s, *state.fs)[:keep],
            x_prev=x if mode != "off" else None,
            prev_order=k,
            spline=spline,
        )
        return x_t, new_state


def recommended_options(
    guidance_scale: float, nfe: int, *, conditional: bool | None = None
) -> dict[str, Any]:
    """The official code's settings for a run (``order`` and solver options).

    - ``order``: 3 unconditional, 2 conditional (README: "order=3 for unconditional sampling
      and order=2 for conditional sampling"); ``conditional`` defaults to ``guidance_scale != 1``.
    - ``corrector``: ``"off"`` at guidance >= 5 (Stable Diffusion txt2img script:
      ``use_corrector = scale < 5.0``), else ``"pseudo"`` (``c_pseudo=True``; README: "better
      in most cases").
    - ``pseudo_order``: only unconditional at ``nfe <= 5`` (score_sde script, 5 steps).
    - ``half_corrector``: False (the official default).
    """
    w = check_finite_float("guidance_scale", guidance_scale)
    check_int("nfe", nfe, minimum=1)
    cond = (w != 1.0) if conditional is None else bool(conditional)
    return {
        "order": 2 if cond else 3,
        "corrector": "off" if w >= 5.0 else "pseudo",
        "pseudo_order": (not cond) and nfe <= 5,
        "half_corrector": False,
    }


def sample_v3(
    model: Any,
    noise: Tensor,
    *,
    ems: EMS,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    guidance_scale: float = 1.0,
    options: Mapping[str, Any] | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    **kwargs: Any,
) -> Any:
    """:func:`dpmsolver.sample` with solver ``dpmv3`` (its ``options`` besides the
    statistics, e.g. ``order``, ``corrector``) after checking that ``ems`` was computed for
    this schedule, prediction and guidance scale and covers the sampled range (ValueError
    naming the mismatch). Other keyword arguments go to ``sample``."""
    from ..recipe import Recipe
    from ..sampling import sample

    lam_a = schedule.knot(schedule.t_max if t_start is None else t_start).lam
    lam_b = schedule.knot(schedule.t_min if t_end is None else t_end).lam
    ems.check(
        schedule=schedule,
        prediction=prediction,
        guidance_scale=guidance_scale,
        lam_range=(lam_a, lam_b) if math.isfinite(lam_a) else None,
    )
    recipe = Recipe("dpmv3", {"ems": ems, **dict(options or {})}, t_start=t_start, t_end=t_end)
    return sample(
        model,
        noise,
        schedule=schedule,
        prediction=prediction,  # type: ignore[arg-type]
        guidance_scale=guidance_scale,
        solver=recipe,
        **kwargs,
    )


_SYNTHETIC = EMS.synthetic()

register(
    SolverInfo(
        name="dpmv3",
        cls=DPMSolverV3,
        orders=(1, 2, 3),
        default_order=2,
        description="DPM-Solver-v3: multistep predictor (orders 1-3) + corrector on the "
        "EMS-reformulated ODE (l, s, b from dpmsolver.ems); without EMS = DPM-Solver++",
        reference="Zheng et al. 2023, DPM-Solver-v3 (arXiv 2310.13268), Sec. 3.1-3.3, Eq. 8",
        configurations=(
            {"order": 2},
            {"order": 1, "corrector": "off"},
            {"order": 3, "corrector": "off"},
            {"order": 2, "ems": _SYNTHETIC, "corrector": "off"},
            {"order": 3, "ems": _SYNTHETIC, "corrector": "off"},
            {"order": 2, "ems": _SYNTHETIC, "corrector": "pseudo"},
            {"order": 3, "ems": _SYNTHETIC, "corrector": "same"},
            {"order": 3, "ems": _SYNTHETIC, "corrector": "full"},
            {"order": 3, "ems": _SYNTHETIC, "corrector": "off", "pseudo_order": True},
            {"order": 2, "ems": _SYNTHETIC, "corrector": "full", "half_corrector": True},
        ),
    ),
)
