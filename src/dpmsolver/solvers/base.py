"""What a solver is, and the exponential-integrator arithmetic the DPM-Solver family shares.

A solver is a small frozen object (its parameters) with a ``step`` that takes explicit
state and returns new state; nothing hidden is kept between steps, so one step can be
tested alone and a run can be replayed. The sampling loop (:mod:`dpmsolver.sampling`)
evaluates the denoiser at the start of every step and passes ``x0_hat`` in; singlestep
solvers make their extra evaluations through the step context.

The exponential integrator (DPM-Solver++, Eq. 9-10). In data-prediction form,

    x_t = (sigma_t/sigma_s) x_s + sigma_t Int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda
        = (sigma_t/sigma_s) x_s - alpha_t phi_1 x0 + alpha_t phi_2 (h x0')
          - alpha_t phi_3 (h^2 x0'') + ...

with ``h = lambda_t - lambda_s``, ``phi_1 = expm1(-h)``, ``phi_2 = phi_1/h + 1``,
``phi_3 = phi_2/h - 1/2``. The noise-prediction form (DPM-Solver, Eq. 3.4) is the same
expression with ``(sigma, alpha, lambda, x0)`` replaced by ``(alpha, sigma, -lambda, eps)``,
so every update below is written once, for a :class:`Form`.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..schedules import Knot, NoiseSchedule

__all__ = [
    "Form",
    "Solver",
    "StepContext",
    "UpdateCoefficients",
    "apply_update",
    "combine",
    "dpmpp_update_coefficients",
    "exponential_moments",
    "first_order_step",
    "heun_update",
    "interpolation_matrix",
    "lagrange_weights",
    "phi_functions",
    "phi_sequence",
    "rescale_to",
    "s_ratio",
    "sigma_step",
    "step_noise",
]


class Form(enum.Enum):
    """Which prediction a solver integrates: data (DPM-Solver++) or noise (DPM-Solver)."""

    DATA = "data"
    NOISE = "noise"

    def prediction(self, x0: Tensor, x: Tensor, knot: Knot) -> Tensor:
        """The integrated quantity at ``knot``: ``x0`` itself, or ``eps = (x - alpha x0)/sigma``."""
        if self is Form.DATA:
            return x0
        return (x - x0 * knot.alpha) / knot.sigma

    def coefficients(self, s: Knot, t: Knot) -> tuple[float, float, float]:
        """``(ratio, b, h)`` of the update ``x_t = ratio x_s - b phi_1(h) m + ...``.

        Data form: ``(sigma_t/sigma_s, alpha_t, lambda_t - lambda_s)``.
        Noise form: ``(alpha_t/alpha_s, sigma_t, lambda_s - lambda_t)``.
        """
        if self is Form.DATA:
            return s_ratio(t.sigma, s.sigma), t.alpha, t.lam - s.lam
        return s_ratio(t.alpha, s.alpha), t.sigma, s.lam - t.lam


def s_ratio(num: float, den: float) -> float:
    """``num / den`` for scale factors; 0 when the numerator is 0."""
    return 0.0 if num == 0.0 else num / den


def phi_sequence(h: float, n: int) -> tuple[float, ...]:
    """``(phi_1, ..., phi_n)`` at ``h`` in the notation above, accurate for small ``|h|``.

    ``phi_1 = expm1(-h)`` and ``phi_{k+1} = phi_k/h - (-1)^k/k!`` (so ``phi_2 = phi_1/h + 1``,
    ``phi_3 = phi_2/h - 1/2``, ``phi_4 = phi_3/h + 1/6``); ``phi_{k+1}`` multiplies the k-th
    derivative term of the expansion. For ``|h| < 0.1`` the recursion loses digits to
    cancellation (``phi_k`` loses about ``1/h^(k-1)`` ulps), so the Taylor series
    ``phi_k = (-1)^(k+1) sum_{j>=1} (-h)^j/(j+k-1)!`` is summed instead.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if math.isinf(h):
        if h > 0:
            # lambda_t = +inf: phi_k -> (-1)^k/(k-1)!
            return tuple((-1.0) ** k / math.factorial(k - 1) for k in range(1, n + 1))
        raise ValueError("phi functions are undefined at h = -inf")
    if abs(h) >= 0.1:
        out = [math.expm1(-h)]
        for k in range(1, n):
            out.append(out[-1] / h - (-1.0) ** k / math.factorial(k))
        return tuple(out)
    sums = [0.0] * n
    term = 1.0  # (-h)^j / j!
    for j in range(1, 14):
        term *= -h / j
        for k in range(1, n + 1):
            # (-h)^j / (j + k - 1)!  with the divisor (j+1)...(j+k-1) formed exactly
            part = term if k == 1 else term / math.prod(range(j + 1, j + k))
            sums[k - 1] = sums[k - 1] + part if k % 2 == 1 else sums[k - 1] - part
    return tuple(sums)


def phi_functions(h: float) -> tuple[float, float, float]:
    """``(phi_1, phi_2, phi_3)`` at ``h`` (see :func:`phi_sequence`)."""
    p1, p2, p3 = phi_sequence(h, 3)
    return p1, p2, p3


def exponential_moments(h: float, n: int) -> list[float]:
    """``mu_0, ..., mu_{n-1}``: the exponential integrator of ``tau^i`` over one step.

    With ``tau = (lambda - lambda_s)/(lambda_t - lambda_s)`` (0 at the start, 1 at the end)
    and a prediction that is the polynomial ``m(tau) = sum_i a_i tau^i``, the exact update
    is ``x_t = ratio x_s + b sum_i mu_i a_i`` (``ratio``, ``b``, ``h`` from
    :meth:`Form.coefficients`), where ``mu_i = h Int_0^1 e^{-h (1 - tau)} tau^i dtau
    = (-1)^(i+1) i! phi_{i+1}(h)``; ``mu_0 = -phi_1`` is DDIM's coefficient.
    """
    phis = phi_sequence(h, n)
    return [(-1.0) ** (i + 1) * math.factorial(i) * phis[i] for i in range(n)]


def lagrange_weights(nodes: Sequence[float], moments: Sequence[float]) -> list[float]:
    """Quadrature weights from interpolation: ``w_j = sum_i c_ji moments[i]`` where
    ``sum_i c_ji tau^i`` is the Lagrange basis polynomial of node ``j``.

    For values ``m_j`` at distinct ``nodes``, ``sum_j w_j m_j = sum_i moments[i] a_i`` with
    ``sum_i a_i tau^i`` the polynomial through ``(nodes[j], m_j)``; equivalently the ``w_j``
    solve ``sum_j w_j nodes[j]^i = moments[i]`` for ``i < len(nodes)`` (a transposed
    Vandermonde system). With plain moments ``1/(i+1)`` these are Adams-Bashforth
    weights; with :func:`exponential_moments` exponential-integrator ones. Host floats.
    """
    n = len(nodes)
    if len(moments) < n:
        raise ValueError(f"need {n} moments for {n} nodes, got {len(moments)}")
    weights = []
    for j, tj in enumerate(nodes):
        coef = [1.0]  # monomial coefficients of prod_{k != j} (tau - t_k)/(t_j - t_k)
        for k, tk in enumerate(nodes):
            if k == j:
                continue
            den = tj - tk
            if den == 0.0:
                raise ValueError(f"interpolation nodes must be distinct, got {list(nodes)}")
            shifted = [0.0, *coef]  # tau * p
            padded = [*coef, 0.0]
            coef = [(shifted[i] - tk * padded[i]) / den for i in range(len(shifted))]
        weights.append(sum(c * mu for c, mu in zip(coef, moments, strict=False)))
    return weights


def combine(x: Tensor, ratio: float, terms: Sequence[tuple[float, Tensor]]) -> Tensor:
    """``ratio * x + sum(c * m)``, skipping zero coefficients (one kernel per term)."""
    out = x * ratio
    for c, m in terms:
        if c != 0.0:
            out = out.add(m, alpha=c)
    return out


def first_order_step(form: Form, x: Tensor, x0: Tensor, m: Tensor, s: Knot, t: Knot) -> Tensor:
    """DDIM / DPM-Solver-1 (DPM-Solver++, Eq. 11): ``x_t = ratio x_s - b phi_1 m``.

    Out of pure noise (``alpha_s = 0``) the noise form is singular, and into the clean end
    (``sigma_t = 0``) its phi_1 is infinite; both forms are the same exact update there, so
    the data form is used.
    """
    if form is Form.NOISE and (s.alpha == 0.0 or t.sigma == 0.0):
        form, m = Form.DATA, x0
    ratio, b, h = form.coefficients(s, t)
    return combine(x, ratio, [(-b * math.expm1(-h), m)])


def sigma_step(
    x: Tensor, s_alpha: float, t_alpha: float, terms: Sequence[tuple[float, Tensor]]
) -> Tensor:
    """An update in k-diffusion's variables ``x~ = x / alpha``, ``sigma~ = sigma / alpha``
    (Karras et al. 2022, EDM Sec. 2): ``x~_t = x~_s + sum c d`` on the state ``x = alpha x~``
    is ``(alpha_t/alpha_s) x + sum (alpha_t c) d`` for ``terms = [(c, d), ...]`` (``c`` in
    units of sigma~, ``d = eps_hat``, since ``dx~/dsigma~ = (x~ - D)/sigma~ = eps_hat``)."""
    return combine(x, s_ratio(t_alpha, s_alpha), [(t_alpha * c, d) for c, d in terms])


@dataclass(frozen=True)
class StepContext:
    """Everything a step needs besides the state: where it goes and how to evaluate.

    Attributes:
        index: step number (0-based).
        s: start knot; t: end knot.
        order: the order to use for this step (after warm-up and final-step rules).
        evaluate: ``evaluate(x, knot) -> x0_hat``; counts network evaluations.
        schedule: for intermediate knots (``schedule.knot_at_lambda``).
        noise: ``noise(a, b)``, standard normal noise shaped like the state for the
            interval from knot ``a`` to ``b`` (stochastic solvers; the normalized Brownian
            increment, see :mod:`dpmsolver.noise`), or None for deterministic runs.
    """

    index: int
    s: Knot
    t: Knot
    order: int
    evaluate: Callable[[Tensor, Knot], Tensor]
    schedule: NoiseSchedule
    noise: Callable[[Knot, Knot], Tensor] | None = None


def step_noise(ctx: StepContext, a: Knot, b: Knot) -> Tensor:
    """``ctx.noise(a, b)``: the standard normal noise of the interval from knot ``a`` to
    ``b`` for a stochastic solver; a ValueError naming ``noise_sampler=`` when the run has
    none."""
    if ctx.noise is None:
        raise ValueError("stochastic solvers need a noise sampler (pass noise_sampler=)")
    return ctx.noise(a, b)


def rescale_to(x: Tensor, src: Knot, dst: Knot) -> Tensor:
    """The state at knot ``dst`` with the same ``x~ = x / alpha`` as ``x`` at ``src``:
    ``(alpha_dst / alpha_src) x`` (``x`` itself when the alphas are equal).

    In k-diffusion's variables (Karras et al. 2022, EDM Sec. 2) a state is ``x~`` at a
    level ``sigma~``; moving it to another level without a step keeps ``x~``. Ancestral
    steps (k-diffusion's ``get_ancestral_step``: a deterministic step to ``sigma_down``,
    then ``sigma_up`` noise at ``sigma~_t``) and EDM's churn (Alg. 2, lines 4-5) end this
    way before their noise is added."""
    return x * (dst.alpha / src.alpha) if src.alpha != dst.alpha else x


def heun_update(ctx: StepContext, x: Tensor, d_s: Tensor) -> Tensor:
    """One Heun step from ``ctx.s`` to ``ctx.t`` (EDM Alg. 1, the trapezoidal rule in
    sigma~) given ``d_s = eps_hat(x, s)``; evaluates the denoiser once, at the Euler point."""
    s, t = ctx.s, ctx.t
    dsig = t.ksigma - s.ksigma
    x_euler = sigma_step(x, s.alpha, t.alpha, [(dsig, d_s)])
    d_t = Form.NOISE.prediction(ctx.evaluate(x_euler, t), x_euler, t)
    return sigma_step(x, s.alpha, t.alpha, [(0.5 * dsig, d_s), (0.5 * dsig, d_t)])


class Solver(ABC):
    """Base class of every registered solver.

    Subclasses are frozen dataclasses of their parameters and implement :meth:`step`;
    they derive from one of the shapes in :mod:`.shapes` (multistep, singlestep,
    adaptive), which own planning and cost. ``order`` is the nominal order;
    ``claimed_order`` the convergence order the tests must measure (equal to ``order``
    unless the method is known to fall short of it).
    """

    #: True if :meth:`step` can integrate into sigma = 0 itself (methods in sigma~, where
    #: that end point is regular); otherwise drivers take that step as ``x = x0_hat``.
    steps_into_zero: ClassVar[bool] = False

    order: int

    @property
    def stochastic(self) -> bool:
        """True if steps draw noise (``ctx.noise`` must then be set)."""
        return False

    @property
    def claimed_order(self) -> float:
        """Convergence order a test must measure on an exact problem."""
        return float(self.order)

    @property
    def scalar_coefficients(self) -> bool:
        """True if every step combines its tensors with host scalars only (so a step is a
        fixed linear combination a front end can precompute); False for solvers whose
        coefficients are per-dimension tensors (DPM-Solver-v3 with statistics)."""
        return True

    def evals_per_step(self, order: int) -> int:
        """Network evaluations of one step of this order (the loop's own one included)."""
        return 1

    def step_evals(self, index: int, order: int) -> int:
        """Network evaluations of grid step ``index`` run at ``order`` (the loop's one
        included). ``evals_per_step(order)`` unless a solver's warm-up steps cost more than
        its later steps of the same order (PNDM's Runge-Kutta warm-up)."""
        return self.evals_per_step(order)

    def init_state(self) -> Any:
        """State before the first step."""
        return None

    @abstractmethod
    def plan(
        self,
        *,
        steps: int | None,
        nfe: int | None,
        final_zero: bool,
        lower_order_final: bool,
    ) -> list[int]:
        """Order of each grid step; its length is the number of grid steps.

        Exactly one of ``steps`` and ``nfe`` is given; ``final_zero`` says the last step is
        the loop's data-prediction step to ``sigma = 0``. Each solver shape
        (:mod:`.shapes`) owns its rule; :func:`dpmsolver.plan.make_plan` applies the rules
        at the ends of the noise range on top.
        """

    @abstractmethod
    def step(self, ctx: StepContext, x: Tensor, x0: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Advance ``x`` from ``ctx.s`` to ``ctx.t`` given ``x0 = D(x, ctx.s)``."""


def interpolation_matrix(taus: Sequence[float], pseudo: bool) -> list[list[float]]:
    """``W[i][k]``: the weight of moment ``M_k`` in node ``i``'s coefficient, for nodes at
    ``taus`` (``taus[0] = 0``, the step's origin).

    Exact interpolation (``pseudo=False``): monomial coefficients of the Lagrange basis
    (the official Vandermonde solve). Pseudo-order: ``g(tau) ~ sum_k g[tau_0..tau_k] tau^k``
    with Newton divided differences in node order, ``g[tau_0..tau_k] = sum_{j<=k} g_j /
    prod_{m<=k, m!=j} (tau_j - tau_m)`` (the official ``pseudo=True``)."""
    n = len(taus)
    if not pseudo:
        unit = [[1.0 if i == k else 0.0 for i in range(n)] for k in range(n)]
        columns = [lagrange_weights(taus, unit[k]) for k in range(n)]
        return [[columns[k][i] for k in range(n)] for i in range(n)]
    out = [[0.0] * n for _ in range(n)]
    for k in range(n):
        for j in range(k + 1):
            den = math.prod(taus[j] - taus[m] for m in range(k + 1) if m != j)
            out[j][k] = 1.0 / den
    return out


@dataclass(frozen=True)
class UpdateCoefficients:
    """``x_c = cx * x_a + sum_i cf[i] * f_i + c0`` (floats without statistics, per-dimension
    tensors with them; ``c0`` None when zero)."""

    cx: float | Tensor
    cf: list[float | Tensor]
    c0: Tensor | None


def dpmpp_update_coefficients(
    a: Knot, c: Knot, nodes: Sequence[float], pseudo: bool
) -> UpdateCoefficients:
    """DPM-Solver++'s multistep update from ``a`` to ``c`` with interpolation nodes
    ``nodes`` (half log-SNRs, ``nodes[0] = a.lam``) in closed form: DPM-Solver-v3's local
    approximation (Eq. 8) with l = 1, s = b = 0."""
    h = c.lam - a.lam
    mat = interpolation_matrix([(lam - a.lam) / h for lam in nodes], pseudo)
    n = len(nodes)
    mus = exponential_moments(h, n)
    cf: list[float | Tensor] = [
        -c.alpha * sum(mat[i][k] * mus[k] for k in range(n)) for i in range(n)
    ]
    return UpdateCoefficients(s_ratio(c.sigma, a.sigma), cf, None)


def apply_update(coef: UpdateCoefficients, x: Tensor, fs: Sequence[Tensor]) -> Tensor:
    """``cx * x + sum cf[i] * f_i + c0`` in ``x``'s dtype (coefficient tensors are cast once)."""
    if not isinstance(coef.cx, Tensor):
        return combine(x, coef.cx, [(float(c), f) for c, f in zip(coef.cf, fs, strict=True)])
    out = x * coef.cx.to(x.dtype)
    for c, f in zip(coef.cf, fs, strict=True):
        assert isinstance(c, Tensor)
        out = out + c.to(x.dtype) * f
    if coef.c0 is not None:
        out = out + coef.c0.to(x.dtype)
    return out
