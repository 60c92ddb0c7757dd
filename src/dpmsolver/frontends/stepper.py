"""Drive a registered solver one network evaluation at a time.

Pipelines such as diffusers' own the loop: they call the network once, hand the output to
the scheduler, and expect the next state back. A multistep solver fits that exactly. A
singlestep solver evaluates the network at intermediate points inside its step, so those
points are listed among the timesteps in advance (as diffusers' singlestep and Heun
schedulers do) and the step is *replayed*: the step function runs from the step's start
with an ``evaluate`` that returns the outputs already received and, at the first one not
yet available, stops (an internal exception) and hands the point it asked for back to the
pipeline. When that output arrives, the step is run again from its start with one more
cached evaluation. Steps are pure functions of their inputs (the state is explicit, see
:mod:`dpmsolver.solvers.base`), so the replay is exact; noise draws of stochastic solvers
are cached the same way.

The rules the sampling loop (:func:`dpmsolver.sampling.solve`) applies around a solver's
step hold here too: out of pure noise and into ``sigma = 0`` only first order is defined,
and the step to ``sigma = 0`` is ``x = x0_hat``. Inversion into pure noise (a flow schedule's
``sigma = 1``) is its mirror image, ``x = eps_hat``.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..plan import boundary_update, is_boundary_step, plan_steps
from ..schedules import Knot, NoiseSchedule
from ..solvers import MultistepSolver, MultistepState, SinglestepSolver, Solver, StepContext

__all__ = [
    "Combination",
    "CompiledStepper",
    "DrivenStep",
    "EvaluationOp",
    "NoiseRequest",
    "OneEvaluationStepper",
    "PinnedSchedule",
    "Program",
    "ReplayingStepper",
    "boundary_take",
    "combine_registers",
    "compile_steps",
    "grouped_plan",
    "probed_plan",
    "supports_fractions",
]

NoiseDraw = Callable[[Tensor, Knot, Knot], Tensor]


def _same_level(a: float, b: float) -> bool:
    """Two half log-SNRs name the same knot (up to the rounding of ``s + r (t - s)``)."""
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


class PinnedSchedule(NoiseSchedule):
    """A schedule whose ``knot_at_lambda`` returns given knots exactly at their lambdas.

    A grid may carry knots that are not the schedule's own resolution of their lambda:
    diffusers rounds the network time of Karras / log-SNR knots to an integer timestep while
    the solver keeps the unrounded noise level. When a singlestep solver asks for an
    intermediate point that is such a knot, it must get that knot, network time included.
    Everything else is delegated to ``base``, with its network time given by
    ``network_time(knot)`` when set (a config whose network takes another time variable,
    e.g. diffusers' ``timestep_type="continuous"``).
    """

    def __init__(
        self,
        base: NoiseSchedule,
        pins: Sequence[Knot],
        network_time: Callable[[Knot], float] | None = None,
    ) -> None:
        self.base = base
        self.network_time = network_time
        self.t_min, self.t_max = base.t_min, base.t_max
        finite = sorted((k for k in pins if math.isfinite(k.lam)), key=lambda k: k.lam)
        self._pins = finite
        self._lams = [k.lam for k in finite]

    def log_alpha(self, t: Tensor) -> Tensor:
        return self.base.log_alpha(t)

    def log_sigma(self, t: Tensor) -> Tensor:
        return self.base.log_sigma(t)

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        return self.base.t_of_lambda(lam)

    def lambda_(self, t: Tensor) -> Tensor:
        return self.base.lambda_(t)

    def model_time(self, t: Tensor) -> Tensor:
        return self.base.model_time(t)

    def t_of_model_time(self, model_t: Tensor) -> Tensor:
        return self.base.t_of_model_time(model_t)

    def knot(self, t: float) -> Knot:
        return self._timed(self.base.knot(t))

    def _timed(self, k: Knot) -> Knot:
        if self.network_time is None or not math.isfinite(k.lam):
            return k
        return dataclasses.replace(k, model_t=self.network_time(k))

    def zero_knot(self) -> Knot:
        return self.base.zero_knot()

    def knot_at_lambda(self, lam: float) -> Knot:
        i = bisect.bisect_left(self._lams, lam)
        for j in (i - 1, i):
            if 0 <= j < len(self._pins) and _same_level(self._lams[j], lam):
                return self._pins[j]
        return self._timed(self.base.knot_at_lambda(lam))


@dataclass(frozen=True)
class DrivenStep:
    """One solver step as a one-evaluation-at-a-time protocol sees it.

    Attributes:
        s, t: start and end knots.
        order: the order of this step (after warm-up, final-step and pure-noise rules).
        solver: the solver object that takes the step.
        evals: knots where the network is evaluated during the step, ``s`` first.
        corrector: apply the solver's corrector at the start of the step (default True;
            see :meth:`incoming`).
    """

    s: Knot
    t: Knot
    order: int
    solver: Solver
    evals: tuple[Knot, ...]
    corrector: bool = True

    def incoming(self, state: Any) -> Any:
        """The state this step starts from: ``state``, or with the corrector's memory
        (``MultistepState.x_prev``) cleared when ``corrector`` is False, so a
        predictor-corrector solver skips its correction here and nothing else changes
        (diffusers' UniPC ``disable_corrector``)."""
        if not self.corrector and isinstance(state, MultistepState):
            return dataclasses.replace(state, x_prev=None)
        return state


def supports_fractions(solver: Solver) -> bool:
    """True for singlestep solvers whose intermediate points are the options ``r1``/``r2``
    (fractions of the step in lambda), which a grid can therefore dictate."""
    if not isinstance(solver, SinglestepSolver) or not dataclasses.is_dataclass(solver):
        return False
    names = {f.name for f in dataclasses.fields(solver)}
    return {"r1", "r2"} <= names


def grouped_plan(solver: Solver, knots: Sequence[Knot], groups: Sequence[int]) -> list[DrivenStep]:
    """Singlestep steps whose intermediate points are grid knots (diffusers'
    ``DPMSolverSinglestepScheduler`` layout): a step of order ``k`` spans ``k`` consecutive
    intervals of ``knots`` and evaluates at each knot it covers, with the fractions
    ``r_j = (lambda_{i+j} - lambda_i) / (lambda_{i+k} - lambda_i)`` taken from the grid.

    ``groups`` lists the order of each step; it must cover every interval.
    """
    if sum(groups) != len(knots) - 1:
        raise ValueError(f"groups {list(groups)} do not cover the {len(knots) - 1} grid intervals")
    if any(g > 1 for g in groups) and not supports_fractions(solver):
        raise ValueError(
            f"{type(solver).__name__} does not take its intermediate points from options r1/r2, "
            "so the grid cannot place them; use the solver's own layout"
        )
    steps: list[DrivenStep] = []
    i = 0
    for g in groups:
        s, t = knots[i], knots[i + g]
        if g > 1 and (math.isinf(s.lam) or math.isinf(t.lam)):
            raise ValueError(
                "a singlestep step of order > 1 cannot start at pure noise or end at sigma = 0"
            )
        step_solver = solver
        if g > 1:
            h = t.lam - s.lam
            fractions = [(knots[i + j].lam - s.lam) / h for j in range(1, g)]
            r2 = fractions[1] if g == 3 else None
            step_solver = dataclasses.replace(solver, order=g, r1=fractions[0], r2=r2)  # type: ignore[type-var]
        steps.append(DrivenStep(s, t, g, step_solver, tuple(knots[i : i + g])))
        i += g
    return steps


def _probe(
    solver: Solver, s: Knot, t: Knot, order: int, schedule: NoiseSchedule, index: int = 0
) -> tuple[Knot, ...]:
    """Where a step evaluates the network: run it once on a dummy state and record every
    knot it asks for. The points of every solver here depend on ``s``, ``t`` and its
    options only, never on the state, so the dummy run finds the real ones."""
    seen = [s]
    dummy = torch.zeros(1, 1, dtype=torch.float64)

    def evaluate(x: Tensor, knot: Knot) -> Tensor:
        seen.append(knot)
        return torch.zeros_like(x)

    ctx = StepContext(index, s, t, order, evaluate, schedule, lambda a, b: torch.zeros_like(dummy))
    solver.step(ctx, dummy, dummy, solver.init_state())
    return tuple(seen)


def probed_plan(
    solver: Solver, knots: Sequence[Knot], orders: Sequence[int], schedule: NoiseSchedule
) -> list[DrivenStep]:
    """One step per interval of ``knots`` with the given orders; each step's evaluation
    points are the ones the solver itself chooses (found by a dry run)."""
    steps = []
    for st in plan_steps(solver, knots, orders):
        if st.evals == 1:
            evals: tuple[Knot, ...] = (st.s,)
        else:
            evals = _probe(solver, st.s, st.t, st.order, schedule, st.index)
        steps.append(DrivenStep(st.s, st.t, st.order, solver, evals))
    return steps


def boundary_take(
    step: DrivenStep, index: int, x: Tensor, x0: Tensor, schedule: NoiseSchedule, state: Any
) -> Tensor:
    """A boundary step (:func:`dpmsolver.plan.boundary_update`) as a driver of diffusers'
    timesteps takes it. A zero-length step (the repeated last level of diffusers'
    ``"sigma_min"`` Karras and flow grids) moves nothing, but its evaluation is the model
    output at the previous step's end, which a predictor-corrector solver uses to correct
    that step (UniC after the last UniP, as ``UniPCMultistepScheduler`` does there); other
    solvers leave the state as it is."""
    s, t = step.s, step.t
    if s.lam == t.lam and math.isfinite(s.lam) and isinstance(step.solver, MultistepSolver):
        ctx = StepContext(index, s, t, 1, _no_evaluation, schedule)
        m0 = step.solver.history_form().prediction(x0, x, s)
        return step.solver.correct(ctx, x, m0, step.incoming(state))
    return boundary_update(x, x0, s, t)


def _no_evaluation(x: Tensor, knot: Knot) -> Tensor:
    raise RuntimeError("a boundary step evaluates nothing")


class _NeedEvaluation(Exception):  # control flow, not an error
    """Raised inside a replayed step at the first evaluation not yet received."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.x = x


class OneEvaluationStepper:
    """Runs planned steps, consuming one data prediction per call.

    Positions count evaluations: position ``p`` is the ``p``-th evaluation of the plan
    (counting from ``offset``, the position of the plan's first evaluation in the caller's
    timesteps). :meth:`advance` takes the data prediction at the current position and
    returns the state at the next one (an intermediate point, or the step's end).

    Args:
        steps: the plan.
        schedule: the schedule the solvers see (a :class:`PinnedSchedule` for grids with
            pinned knots).
        offset: position of the first evaluation (default 0).
    """

    def __init__(
        self, steps: Sequence[DrivenStep], schedule: NoiseSchedule, offset: int = 0
    ) -> None:
        if not steps:
            raise ValueError("the plan has no steps")
        self.steps = list(steps)
        self.schedule = schedule
        self.offset = offset
        self._where = [(p, j) for p, st in enumerate(self.steps) for j in range(len(st.evals))]
        self._next = offset
        self._state: Any = self.steps[0].solver.init_state()
        self._x: Tensor | None = None
        self._x0: Tensor | None = None
        self._cache: list[Tensor] = []
        self._noise: list[Tensor] = []

    @property
    def evaluations(self) -> list[Knot]:
        """Every evaluation knot in order."""
        return [k for st in self.steps for k in st.evals]

    @property
    def next_position(self) -> int:
        """The position whose data prediction :meth:`advance` expects next."""
        return self._next

    @property
    def done(self) -> bool:
        """True once the last step has finished."""
        return self._next == self.offset + len(self._where)

    def locate(self, position: int) -> tuple[DrivenStep, int]:
        """The step holding evaluation ``position`` and its index among the step's evaluations."""
        p, j = self._where[position - self.offset]
        return self.steps[p], j

    def advance(self, x0: Tensor, x: Tensor, draw_noise: NoiseDraw | None = None) -> Tensor:
        """Take ``x0 = D(x)`` at the current position; return the state at the next one.

        Args:
            x0: data prediction at the current evaluation knot.
            x: the state the network was evaluated at.
            draw_noise: ``draw_noise(x) -> standard normal like x`` for stochastic solvers.
        """
        if self.done:
            raise RuntimeError("all planned steps are done; set the timesteps again to sample anew")
        p, j = self._where[self._next - self.offset]
        step = self.steps[p]
        if j == 0:
            self._x, self._x0, self._cache, self._noise = x, x0, [], []
        else:
            self._cache.append(x0)
        out = self._run(p, step, draw_noise)
        self._next += 1
        return out

    def _run(self, index: int, step: DrivenStep, draw_noise: NoiseDraw | None) -> Tensor:
        assert self._x is not None and self._x0 is not None
        x, x0, s, t = self._x, self._x0, step.s, step.t
        if is_boundary_step(step.solver, s, t):  # sigma = 0, pure noise, or a repeated knot
            return boundary_take(step, index, x, x0, self.schedule, self._state)
        if step.solver.stochastic and draw_noise is None:
            raise ValueError(
                f"{type(step.solver).__name__} is stochastic: a noise source is required"
            )
        cache, noises = self._cache, self._noise
        used = [0, 0]  # evaluations and noise draws consumed by this replay

        def evaluate(x_eval: Tensor, knot: Knot) -> Tensor:
            k = used[0]
            if k < len(cache):
                used[0] += 1
                return cache[k]
            expected = step.evals[k + 1] if k + 1 < len(step.evals) else None
            if expected is None or not _same_level(knot.lam, expected.lam):
                where = "none" if expected is None else f"lambda={expected.lam:.9g}"
                raise RuntimeError(
                    f"step {index} asked for an evaluation at lambda={knot.lam:.9g} but the "
                    f"timesteps planned {where}; the solver's evaluation points changed"
                )
            raise _NeedEvaluation(x_eval)

        def noise(a: Knot, b: Knot) -> Tensor:
            n = used[1]
            if n == len(noises):
                assert draw_noise is not None
                noises.append(draw_noise(x, a, b))
            used[1] += 1
            return noises[n]

        ctx = StepContext(
            index, s, t, step.order, evaluate, self.schedule, noise if draw_noise else None
        )
        try:
            x_next, new_state = step.solver.step(ctx, x, x0, step.incoming(self._state))
        except _NeedEvaluation as pending:
            return pending.x
        self._state = new_state
        return x_next


# ----------------------------------------------------------------------------------------
# Compiled plans: every evaluation as fixed linear combinations
# ----------------------------------------------------------------------------------------
#
# A solver step is linear in everything it is given: the state x, the data predictions,
# the stored predictions of earlier steps and the noise draws, with coefficients that
# depend on the knots and the plan only (DPM-Solver++ Eq. 9-10 and every method built on
# them; the sampling loop relies on the same fact when it computes coefficients on the
# host). So a whole plan can be run once, at planning time, on *symbolic* tensors: unit
# vectors, one per input, in float64. What each step returns (and what it stores in its
# state) is then a vector of coefficients over those inputs, taken from the solver's own
# code; nothing is re-derived here. At sampling time an evaluation is a few fused
# ``torch.add`` calls with those coefficients: no replay, no StepContext, no per-step
# Python objects. tests/test_frontends_stepper.py checks, for every registered solver,
# that the compiled plan equals the replayed one (:class:`OneEvaluationStepper`), so a
# solver whose step is not linear in its inputs cannot slip in unnoticed.

Terms = tuple[tuple[int, float], ...]

_NOISE_SLOTS = 8  # noise draws one step may make (the solvers here make at most 2)


@dataclass(frozen=True)
class Combination:
    """``registers[target] = sum(c * registers[r] for r, c in terms)``."""

    target: int
    terms: Terms


@dataclass(frozen=True)
class NoiseRequest:
    """Standard normal noise for the interval from knot ``a`` to ``b``, into ``target``."""

    target: int
    a: Knot
    b: Knot


@dataclass(frozen=True)
class EvaluationOp:
    """What happens at one evaluation position.

    Attributes:
        knot: where the network was evaluated.
        sample, output: registers that receive the state the network saw and its output.
        x0: the data prediction as a combination of ``sample`` and ``output``, when it must
            be materialized to be transformed (thresholding); None when it is linear and
            folded into the combinations below.
        noise: noise drawn at this position, in order.
        store: state tensors the solver keeps for later steps.
        result: the state returned for the next position.
        free: registers not needed after this position.
    """

    knot: Knot
    sample: int
    output: int
    x0: Combination | None
    noise: tuple[NoiseRequest, ...]
    store: tuple[Combination, ...]
    result: Terms
    free: tuple[int, ...]


@dataclass(frozen=True)
class Program:
    """A compiled plan: one :class:`EvaluationOp` per evaluation, over ``registers``."""

    ops: tuple[EvaluationOp, ...]
    registers: int


@dataclass(frozen=True)
class _Reg:
    """A state tensor between steps: register ``index``, value ``factor * registers[index]``."""

    index: int
    factor: float


_ATOMS = (Knot, int, float, bool, str, type(None))


def _map_leaves(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with every Tensor or :class:`_Reg` leaf replaced by ``fn(leaf)`` (through
    tuples, lists and dataclasses); unchanged objects are returned as they are."""
    if isinstance(obj, (Tensor, _Reg)):
        return fn(obj)
    if isinstance(obj, _ATOMS):
        return obj
    if isinstance(obj, (tuple, list)):
        items = [_map_leaves(v, fn) for v in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return type(obj)(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            old = getattr(obj, f.name)
            new = _map_leaves(old, fn)
            if new is not old:
                changes[f.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj


def _leaves(obj: Any) -> list[Any]:
    found: list[Any] = []

    def keep(leaf: Any) -> Any:
        found.append(leaf)
        return leaf

    _map_leaves(obj, keep)
    return found


class _StepBasis:
    """The symbolic inputs of one step: a unit vector per register it may read."""

    def __init__(self, registers: Sequence[int], noise_slots: int) -> None:
        self.registers = list(registers)
        self.size = len(self.registers) + noise_slots
        self._eye = torch.eye(self.size, dtype=torch.float64)
        self._vectors: dict[int, Tensor] = {}

    def vector(self, register: int) -> Tensor:
        """The unit vector of ``register`` (the same object on every call)."""
        if register not in self._vectors:
            self._vectors[register] = self._eye[self.registers.index(register)].reshape(1, -1)
        return self._vectors[register]

    def add_noise(self, register: int) -> Tensor:
        if len(self.registers) == self.size:
            raise RuntimeError(f"a step drew more than {_NOISE_SLOTS} noise tensors")
        self.registers.append(register)
        return self.vector(register)

    def register_of(self, vec: Tensor) -> int | None:
        """The register whose unit vector ``vec`` is (by identity), if any."""
        for reg, v in self._vectors.items():
            if v is vec:
                return reg
        return None

    def terms(self, vec: Tensor) -> list[tuple[int, float]]:
        """``vec`` as ``[(register, coefficient)]``, zero coefficients dropped."""
        values = vec.reshape(-1).tolist()
        return [(self.registers[i], c) for i, c in enumerate(values) if c != 0.0]


def compile_steps(
    steps: Sequence[DrivenStep],
    schedule: NoiseSchedule,
    data: Callable[[Knot], tuple[float, float]],
    *,
    transform_x0: bool = False,
) -> Program:
    """Compile planned steps into a :class:`Program` (see the comment above).

    Args:
        steps: the plan (as for :class:`OneEvaluationStepper`).
        schedule: the schedule the solvers see.
        data: ``data(knot) -> (cx, co)``, the data prediction at an evaluation being
            ``cx * sample + co * output`` (the parameterization's coefficients).
        transform_x0: the data prediction is transformed (e.g. thresholded) before the
            solver sees it, so it is materialized at every evaluation.
    """
    if not steps:
        raise ValueError("the plan has no steps")
    compiler = _Compiler(schedule, data, transform_x0)
    state: Any = steps[0].solver.init_state()
    if _leaves(state):
        raise ValueError("a solver's initial state must hold no tensors")
    for index, step in enumerate(steps):
        state = compiler.step(index, step, state)
    return compiler.finish()


class _Compiler:
    """Runs steps on symbolic tensors and records the combinations (:func:`compile_steps`)."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        data: Callable[[Knot], tuple[float, float]],
        transform_x0: bool,
    ) -> None:
        self.schedule = schedule
        self.data = data
        self.transform_x0 = transform_x0
        self.counter = itertools.count()
        self.ops: list[dict[str, Any]] = []

    def step(self, index: int, step: DrivenStep, state: Any) -> Any:
        """Record ``step`` (state entering as registers); return the state after it."""
        n = len(step.evals)
        samples = [next(self.counter) for _ in range(n)]
        outputs = [next(self.counter) for _ in range(n)]
        x0_regs = [next(self.counter) for _ in range(n)] if self.transform_x0 else []
        incoming = sorted({leaf.index for leaf in _leaves(state)})
        basis = _StepBasis(
            incoming + samples + outputs + x0_regs, _NOISE_SLOTS if step.solver.stochastic else 0
        )
        first = len(self.ops)
        for j, knot in enumerate(step.evals):
            x0_comb = None
            if self.transform_x0:
                cx, co = self.data(knot)
                terms = tuple((r, c) for r, c in ((samples[j], cx), (outputs[j], co)) if c != 0)
                x0_comb = Combination(x0_regs[j], terms)
            self.ops.append(
                {
                    "knot": knot,
                    "sample": samples[j],
                    "output": outputs[j],
                    "x0": x0_comb,
                    "noise": [],
                    "store": [],
                    "result": None,
                }
            )
        ops = self.ops[first:]

        def x0_vector(j: int) -> Tensor:
            if self.transform_x0:
                return basis.vector(x0_regs[j])
            cx, co = self.data(step.evals[j])
            return basis.vector(samples[j]) * cx + basis.vector(outputs[j]) * co

        calls = [0]  # evaluations requested so far (the one at the start excluded)

        def evaluate(x_eval: Tensor, knot: Knot) -> Tensor:
            k = calls[0] + 1
            expected = step.evals[k] if k < n else None
            if expected is None or not _same_level(knot.lam, expected.lam):
                where = "none" if expected is None else f"lambda={expected.lam:.9g}"
                raise RuntimeError(
                    f"step {index} asked for an evaluation at lambda={knot.lam:.9g} but the "
                    f"timesteps planned {where}; the solver's evaluation points changed"
                )
            ops[k - 1]["result"] = x_eval
            calls[0] = k
            return x0_vector(k)

        def noise(a: Knot, b: Knot) -> Tensor:
            reg = next(self.counter)
            ops[calls[0]]["noise"].append(NoiseRequest(reg, a, b))
            return basis.add_noise(reg)

        # State tensors enter as their registers' unit vectors times the registers'
        # factors; remember which object stands for which register.
        entering: dict[int, _Reg] = {}

        def enter(leaf: _Reg) -> Tensor:
            vec = basis.vector(leaf.index)
            if leaf.factor != 1.0:
                vec = vec * leaf.factor
            entering[id(vec)] = leaf
            return vec

        sym_state = _map_leaves(step.incoming(state), enter)
        x, x0 = basis.vector(samples[0]), x0_vector(0)
        if is_boundary_step(step.solver, step.s, step.t):
            x_next = boundary_take(step, index, x, x0, self.schedule, state=sym_state)
            new_state = sym_state
        else:
            ctx = StepContext(
                index,
                step.s,
                step.t,
                step.order,
                evaluate,
                self.schedule,
                noise if step.solver.stochastic else None,
            )
            x_next, new_state = step.solver.step(ctx, x, x0, sym_state)
        if calls[0] != n - 1:
            raise RuntimeError(
                f"step {index} evaluated {calls[0] + 1} times but the timesteps planned {n}"
            )
        ops[-1]["result"] = x_next
        for op in ops:
            op["result"] = tuple(basis.terms(op["result"]))

        # Tensors the solver keeps become registers, computed at the step's last position
        # (a kept tensor that is one register times a factor is that register).
        kept: dict[int, _Reg] = {}

        def leave(vec: Tensor) -> _Reg:
            if id(vec) in entering:
                return entering[id(vec)]
            if id(vec) not in kept:
                terms = basis.terms(vec)
                if not terms:
                    kept[id(vec)] = _Reg(samples[0], 0.0)
                elif len(terms) == 1:
                    kept[id(vec)] = _Reg(terms[0][0], terms[0][1])
                else:
                    reg, c0 = next(self.counter), terms[0][1]
                    ops[-1]["store"].append(Combination(reg, tuple((r, c / c0) for r, c in terms)))
                    kept[id(vec)] = _Reg(reg, c0)
            return kept[id(vec)]

        return _map_leaves(new_state, leave)

    def finish(self) -> Program:
        """Drop stores nobody reads and free every register after its last use."""
        ops = self.ops
        live: set[int] = set()
        for op in reversed(ops):
            live.update(r for r, _ in op["result"])
            kept = []
            for comb in reversed(op["store"]):
                if comb.target in live:
                    kept.append(comb)
                    live.update(r for r, _ in comb.terms)
            op["store"] = kept[::-1]
            if op["x0"] is not None:
                live.update(r for r, _ in op["x0"].terms)
        last_use: dict[int, int] = {}
        for p, op in enumerate(ops):
            touched = [op["sample"], op["output"], *(d.target for d in op["noise"])]
            touched += [r for r, _ in op["result"]]
            for comb in [*op["store"], *([op["x0"]] if op["x0"] is not None else [])]:
                touched += [comb.target, *(r for r, _ in comb.terms)]
            for r in touched:
                last_use[r] = p
        frees: list[list[int]] = [[] for _ in ops]
        for r, p in last_use.items():
            frees[p].append(r)
        return Program(
            tuple(
                EvaluationOp(
                    knot=op["knot"],
                    sample=op["sample"],
                    output=op["output"],
                    x0=op["x0"],
                    noise=tuple(op["noise"]),
                    store=tuple(op["store"]),
                    result=op["result"] or ((op["sample"], 0.0),),
                    free=tuple(sorted(frees[p])),
                )
                for p, op in enumerate(ops)
            ),
            next(self.counter),
        )


def combine_registers(registers: list[Any], terms: Terms) -> Tensor:
    """``sum(c * registers[r] for r, c in terms)`` in as few kernels as the terms allow:
    a single unit term is the register itself; otherwise one multiply (skipped when the
    first coefficient is 1) and one in-place add per further term."""
    r, c = terms[0]
    first = registers[r]
    if len(terms) == 1:
        return first if c == 1.0 else first * c
    r1, c1 = terms[1]
    if c == 1.0:
        out = torch.add(first, registers[r1], alpha=c1)
    else:
        out = torch.mul(first, c)
        out.add_(registers[r1], alpha=c1)
    for r, c in terms[2:]:
        out.add_(registers[r], alpha=c)
    return out


class CompiledStepper:
    """Runs a :class:`Program`, one evaluation per :meth:`advance`: the counterpart of
    :class:`OneEvaluationStepper` without replay (same positions, same results up to
    rounding).

    Args:
        program: the compiled plan.
        offset: position of its first evaluation in the caller's timesteps (default 0).
    """

    def __init__(self, program: Program, offset: int = 0) -> None:
        self.program = program
        self.ops = program.ops
        self.offset = offset
        self._next = 0
        self._registers: list[Any] = [None] * program.registers

    @property
    def next_position(self) -> int:
        """The position whose evaluation :meth:`advance` expects next."""
        return self.offset + self._next

    @property
    def done(self) -> bool:
        """True once every evaluation has been consumed."""
        return self._next == len(self.ops)

    def op_at(self, position: int) -> EvaluationOp:
        """The operation of evaluation ``position``."""
        return self.ops[position - self.offset]

    def advance(
        self,
        sample: Tensor,
        output: Tensor,
        draw_noise: NoiseDraw | None = None,
        transform_x0: Callable[[Tensor, Knot], Tensor] | None = None,
    ) -> Tensor:
        """Take the network ``output`` at ``sample`` for the current position; return the
        state for the next one.

        Args:
            sample: the state the network saw.
            output: the network's output there (the program knows its parameterization).
            draw_noise: ``draw_noise(like, a, b)``, standard normal noise for the interval
                from knot ``a`` to ``b`` (stochastic solvers).
            transform_x0: ``transform_x0(x0, knot)``, applied to each materialized data
                prediction with the knot it was made at (thresholding, a norm cap);
                required when the program was compiled with ``transform_x0``.
        """
        if self._next >= len(self.ops):
            raise RuntimeError("all planned steps are done; set the timesteps again to sample anew")
        op = self.ops[self._next]
        regs = self._registers
        regs[op.sample] = sample
        regs[op.output] = output
        if op.x0 is not None:
            assert transform_x0 is not None
            regs[op.x0.target] = transform_x0(combine_registers(regs, op.x0.terms), op.knot)
        for draw in op.noise:
            if draw_noise is None:
                raise ValueError("this solver is stochastic: a noise source is required")
            regs[draw.target] = draw_noise(sample, draw.a, draw.b)
        for comb in op.store:
            regs[comb.target] = combine_registers(regs, comb.terms)
        out = combine_registers(regs, op.result)
        for r in op.free:
            regs[r] = None
        self._next += 1
        return out


class ReplayingStepper:
    """:class:`CompiledStepper`'s interface over :class:`OneEvaluationStepper`, for plans a
    program cannot hold: solvers whose coefficients are per-dimension tensors
    (:attr:`~dpmsolver.solvers.Solver.scalar_coefficients` False) are replayed step by step.

    Args:
        steps: the plan.
        schedule: the schedule the solvers see.
        data: ``data(knot) -> (cx, co)`` with ``x0 = cx * x + co * output``.
        offset: position of the first evaluation.
    """

    def __init__(
        self,
        steps: Sequence[DrivenStep],
        schedule: NoiseSchedule,
        data: Callable[[Knot], tuple[float, float]],
        offset: int = 0,
    ) -> None:
        self._inner = OneEvaluationStepper(steps, schedule, offset)
        self._data = data

    @property
    def next_position(self) -> int:
        """The position whose network output :meth:`advance` expects next."""
        return self._inner.next_position

    @property
    def done(self) -> bool:
        """True once the last step has finished."""
        return self._inner.done

    def advance(
        self,
        sample: Tensor,
        output: Tensor,
        draw_noise: NoiseDraw | None = None,
        transform_x0: Callable[[Tensor, Knot], Tensor] | None = None,
    ) -> Tensor:
        """As :meth:`CompiledStepper.advance`."""
        step, j = self._inner.locate(self._inner.next_position)
        knot = step.evals[j]
        cx, co = self._data(knot)
        x0 = output * co if cx == 0.0 else sample * cx + output * co
        if transform_x0 is not None:
            x0 = transform_x0(x0, knot)
        return self._inner.advance(x0, sample, draw_noise)
