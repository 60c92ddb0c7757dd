"""UniPC: the unified predictor-corrector multistep solver.

Zhao et al. 2023, "UniPC" (arXiv 2302.04867): the predictor UniP-p, the corrector UniC-p and
UniPC-p, with the B(h) choices "bh1" and "bh2" of the paper and its official code (and
diffusers' ``UniPCMultistepScheduler``). In the notation of :mod:`dpmsolver.solvers.base`
(``ratio``, ``b``, ``h`` of the solver's :class:`~dpmsolver.solvers.base.Form`, ``phi_1 =
expm1(-h)``), from a start point with prediction ``m0`` and other predictions ``m_k`` at
``r_k = (lambda_k - lambda_s)/(lambda_t - lambda_s)``:

    x_t = ratio x_s - b phi_1 m0 - b B(h) sum_k rho_k D1_k,      D1_k = (m_k - m0) / r_k
    sum_k rho_k r_k^(i-1) = -mu_i / B(h)   for i = 1..n           (mu_i: base.exponential_moments)

with ``B(h) = -h`` ("bh1") or ``B(h) = expm1(-h)`` ("bh2"), i.e. the paper's ``B(h) = hh``
or ``e^hh - 1`` with ``hh = -h``. UniP-p (predictor) uses the ``p - 1`` previous
predictions (``r_k < 0``); UniC-p (corrector) uses those and the prediction at the new
point (``r = 1``), so it is an implicit-Adams-type update made explicit by evaluating at
the predicted point. With two or more unknowns ``B(h)`` cancels (the system then makes the
update integrate the interpolating polynomial exactly, as DEIS does); with one unknown the
official code and diffusers set ``rho = 1/2``, its limit for h -> 0, and we do the same, so
"bh1" and "bh2" differ exactly in those steps (UniP-2 and UniC-1).

The corrector of step i needs the model output at the predicted point, which is the
evaluation the loop makes at the start of step i + 1; so each step first corrects the
incoming state with that evaluation and then predicts from the corrected state, reusing the
same evaluation (no extra network call). The prediction is *not* re-evaluated at the
corrected point. UniC after UniP-p uses the same p (p - 1 old predictions plus the new
one) and raises the order to p + 1, as the paper shows: UniPC-p converges with order p + 1
(measured; README).
The last step is left uncorrected (no evaluation follows it), and a step into sigma = 0 is
the loop's data-prediction step, whatever B(h) is (diffusers' bh1 returns NaN there).

``corrector_order`` c counts the corrector's nodes as SA-Solver does (Xue et al. 2023,
"SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models", arXiv
2309.05019, Eq. 16 / Algorithm 2 with tau = 0: the SA-Corrector is the implicit Adams
update of the exponential integrator over the c newest predictions, the new one included):
the default c = p + 1 is UniC-p; c < p + 1 drops the oldest predictions from the corrector.
SA-Solver's ODE form (tau = 0) is this family: its predictor is the exponential Adams-
Bashforth update over the p newest predictions, and its updates with two nodes carry the
O(h^3) term it adds "similar to UniPC", which is exactly B(h) = h with rho = 1/2 here. So
diffusers' ``SASolverScheduler(predictor_order=p, corrector_order=c, tau_func=0)`` is
``UniPC(order=p, variant="bh1", corrector_order=c)`` (tested against it to 1e-10, p = 1-3);
the method converges with order c.

``corrector_skip`` lists the steps whose result is left uncorrected: the corrector that the
step after step i would apply (with the evaluation at step i's end) is skipped when i is
listed, as diffusers' ``UniPCMultistepScheduler(disable_corrector=[...])``, whose
documentation recommends it for the first steps under large guidance, where the guided
prediction at the predicted point can pull the correction off. Every step still costs one
evaluation; ``tune``'s stage (i) chooses the list per budget (a study).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from .._validate import check_choice, check_int
from ..schedules import Knot
from .base import Form, StepContext, combine, exponential_moments, lagrange_weights
from .registry import SolverInfo, register
from .shapes import MultistepSolver, MultistepState

__all__ = ["UniPC", "uni_update"]

Variant = Literal["bh1", "bh2"]


def uni_update(
    form: Form,
    variant: Variant,
    x: Tensor,
    start: Knot,
    end: Knot,
    m0: Tensor,
    others: Sequence[tuple[Knot, Tensor]],
) -> Tensor:
    """The UniP / UniC update from ``start`` to ``end`` (module docstring) with ``m0`` at
    ``start`` and the predictions ``others`` (at least one) at their knots."""
    ratio, b, h = form.coefficients(start, end)
    step = end.lam - start.lam
    nodes = [(k.lam - start.lam) / step for k, _ in others]
    if len(nodes) == 1:
        big_b = -h if variant == "bh1" else math.expm1(-h)
        b_rho = [0.5 * big_b]  # the official rho = 1/2 (module docstring)
    else:
        mus = exponential_moments(h, len(nodes) + 1)
        b_rho = lagrange_weights(nodes, [-mu for mu in mus[1:]])  # B(h) rho_k
    c0 = -b * math.expm1(-h) + b * sum(br / r for br, r in zip(b_rho, nodes, strict=True))
    terms = [(c0, m0)]
    terms += [(-b * br / r, m) for br, r, (_, m) in zip(b_rho, nodes, others, strict=True)]
    return combine(x, ratio, terms)


@dataclass(frozen=True)
class UniPC(MultistepSolver):
    """UniPC-p (predictor UniP-p with corrector UniC-p), multistep, one evaluation per step.

    Args:
        order: predictor order p: 1, 2 (default, as diffusers) or 3; with the corrector the
            method converges with order p + 1.
        variant: ``"bh2"`` (default; B(h) = expm1(h), diffusers' default) or ``"bh1"``
            (B(h) = h).
        use_corrector: apply UniC (default True); without it this is UniP-p, order p.
        form: ``Form.DATA`` (default; diffusers' ``predict_x0=True``) or ``Form.NOISE``
            (``"data"`` / ``"noise"`` are accepted too).
        corrector_order: the corrector's nodes, the new prediction included (SA-Solver's
            corrector order; module docstring): 2 to p + 1, None (default) for p + 1
            (UniC-p). The method converges with this order.
        corrector_skip: indices of the steps whose result is not corrected (module
            docstring; diffusers' ``disable_corrector``); default none.
    """

    order: int = 2
    variant: Variant = "bh2"
    use_corrector: bool = True
    form: Form = Form.DATA
    corrector_order: int | None = None
    corrector_skip: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3))
        check_choice("variant", self.variant, ("bh1", "bh2"))
        check_choice("use_corrector", self.use_corrector, (True, False))
        if self.corrector_order is not None:
            check_choice("corrector_order", self.corrector_order, tuple(range(2, self.order + 2)))
        if isinstance(self.form, str):
            name = check_choice("form", self.form, ("data", "noise"))
            object.__setattr__(self, "form", Form(name))
        check_choice("form", self.form, tuple(Form))
        skip = self.corrector_skip
        if isinstance(skip, (str, bytes)) or not hasattr(skip, "__iter__"):
            raise ValueError(f"corrector_skip must be a sequence of step indices, got {skip!r}")
        # a tuple of distinct sorted ints, so that equal lists make equal (hashable) solvers
        checked = {check_int(f"corrector_skip[{i}]", v, minimum=0) for i, v in enumerate(skip)}
        object.__setattr__(self, "corrector_skip", tuple(sorted(checked)))

    @property
    def claimed_order(self) -> float:
        return float(self._corrector_nodes if self.use_corrector else self.order)

    @property
    def _corrector_nodes(self) -> int:
        return self.order + 1 if self.corrector_order is None else self.corrector_order

    def history_form(self) -> Form:
        return self.form

    @property
    def history_size(self) -> int:
        # The corrector of the next step needs this step's p - 1 old predictions too.
        return self.order if self.use_corrector else self.order - 1

    def correct(self, ctx: StepContext, x: Tensor, m0: Tensor, state: MultistepState) -> Tensor:
        """UniC-p: correct the incoming (predicted) state with the model output there
        (``m0``, which this step's predictor reuses unchanged)."""
        if (
            not self.use_corrector
            or ctx.index - 1 in self.corrector_skip
            or state.x_prev is None
            or not math.isfinite(state.knots[0].lam)
            or not math.isfinite(ctx.s.lam)
        ):
            return x
        # the previous step's p - 1 old predictions, or fewer for a shorter corrector
        old = min(state.prev_order, self._corrector_nodes - 1)
        others = [*zip(state.knots[1:old], state.preds[1:old], strict=True), (ctx.s, m0)]
        return uni_update(
            self.form, self.variant, state.x_prev, state.knots[0], ctx.s, state.preds[0], others
        )

    def update(
        self, ctx: StepContext, k: int, x: Tensor, m0: Tensor, state: MultistepState
    ) -> Tensor:
        """UniP-k from the (corrected) state."""
        history = list(zip(state.knots[: k - 1], state.preds[: k - 1], strict=True))
        return uni_update(self.form, self.variant, x, ctx.s, ctx.t, m0, history)

    def remember(
        self, state: MultistepState, s: Knot, m0: Tensor, x: Tensor, k: int
    ) -> MultistepState:
        x_prev = x if self.use_corrector else None
        return state.push(s, m0, self.history_size, x_prev=x_prev, order=k)


register(
    SolverInfo(
        name="unipc",
        cls=UniPC,
        orders=(1, 2, 3),
        default_order=2,
        description="UniPC-p: multistep predictor UniP-p + corrector UniC-p reusing the new "
        "evaluation (order p + 1); B(h) = h (bh1) or expm1(h) (bh2)",
        reference="Zhao et al. 2023, UniPC (arXiv 2302.04867): UniP-p + UniC-p, B(h)",
        configurations=(
            {"order": 1, "variant": "bh1"},
            {"order": 2, "variant": "bh1"},
            {"order": 3, "variant": "bh1"},
            {"order": 1, "variant": "bh2"},
            {"order": 2, "variant": "bh2"},
            {"order": 3, "variant": "bh2"},
            {"order": 2, "variant": "bh2", "use_corrector": False},
            {"order": 3, "variant": "bh2", "use_corrector": False},
            {"order": 2, "variant": "bh2", "form": "noise"},
            {"order": 3, "variant": "bh2", "form": "noise"},
            {"order": 2, "variant": "bh1", "corrector_order": 2},
        ),
    ),
    aliases={
        "unipc_bh1": {"variant": "bh1"},
        "unipc_bh2": {"variant": "bh2"},
        "sa_solver_ode": {"variant": "bh1", "corrector_order": 2},
    },
)
