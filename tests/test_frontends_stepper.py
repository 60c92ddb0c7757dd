"""Driving solvers one network evaluation at a time: the replay is exact, intermediate
points land on the timesteps listed in advance, noise draws are replayed, and the plan
rules match the sampling loop's. No diffusers needed."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import dpmsolver as dp
from dpmsolver.frontends.diffusers_grid import singlestep_groups
from dpmsolver.frontends.stepper import (
    CompiledStepper,
    DrivenStep,
    OneEvaluationStepper,
    PinnedSchedule,
    compile_steps,
    grouped_plan,
    probed_plan,
    supports_fractions,
)
from dpmsolver.noise import SeededNoise
from dpmsolver.parameterization import data_coefficients, from_data
from dpmsolver.solvers import (
    AdaptiveSolver,
    SinglestepSolver,
    StepContext,
    configurations,
    first_order_step,
)
from dpmsolver.solvers.base import Form

SD = dp.DiscreteVPSchedule()
MIX = dp.default_mixture(dim=6, num_classes=3, components_per_class=2, seed=1)
DEN = dp.MixtureDenoiser(MIX)


def drive(
    stepper: OneEvaluationStepper, x: Tensor, denoiser: Any = DEN, noise: Any = None
) -> tuple[Tensor, int]:
    """The pipeline's side of the protocol: evaluate at each listed knot, hand it over."""
    calls = 0
    for position, knot in enumerate(stepper.evaluations):
        assert stepper.next_position == position
        x = stepper.advance(denoiser(x, knot), x, noise)
        calls += 1
    assert stepper.done
    return x, calls


CASES = [(n, dict(c)) for n, c, s in configurations() if not isinstance(s, AdaptiveSolver)]


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=[f"{n}-{c}" for n, c in CASES])
@pytest.mark.parametrize("final", ["zero", "t_min"])
def test_replayed_steps_equal_the_sampling_loop(name: str, cfg: dict[str, Any], final: str) -> None:
    """Every registered solver, driven one evaluation at a time with its own intermediate
    points (probed in advance), reproduces dp.solve on the same grid and orders exactly."""
    solver = dp.get_solver(name, **cfg)
    grid = dp.make_grid(SD, 5, final=final)  # type: ignore[arg-type]
    orders = solver.plan(
        steps=grid.steps, nfe=None, final_zero=grid.final_zero, lower_order_final=True
    )
    x = (
        torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        * grid.knots[0].sigma
    )

    # Stochastic solvers: both drivers draw from identical per-sample streams.
    def noise() -> SeededNoise | None:
        return SeededNoise([11, 12, 13]) if solver.stochastic else None

    expected = dp.solve(DEN, x, grid, solver, orders=orders, noise_sampler=noise())
    plan = probed_plan(solver, grid.knots, orders, SD)
    out, calls = drive(OneEvaluationStepper(plan, SD), x, noise=noise())
    assert calls == expected.nfe
    assert torch.allclose(out, expected.x, atol=1e-12, rtol=0)


# Solvers whose coefficients are per-dimension tensors cannot be compiled (the scheduler
# replays them: tests/test_frontends_diffusers.py).
ALL_CASES = [(n, dict(c)) for n, c, s in configurations() if s.scalar_coefficients]


def run_compiled(
    plan: list[DrivenStep], x: Tensor, noise: Any = None, prediction: str = "eps"
) -> tuple[Tensor, int]:
    """A pipeline's loop over a compiled plan: the network's raw output (``prediction``)
    at each listed knot, handed over with the state it saw."""
    program = compile_steps(
        plan,
        SD,
        lambda k: data_coefficients(prediction, k.alpha, k.sigma),  # type: ignore[arg-type]
    )
    stepper = CompiledStepper(program)
    for op in program.ops:
        k = op.knot
        out = from_data(DEN(x, k), x, k.alpha, k.sigma, prediction)  # type: ignore[arg-type]
        x = stepper.advance(x, out, noise)
    assert stepper.done
    return x, len(program.ops)


@pytest.mark.parametrize(("name", "cfg"), ALL_CASES, ids=[f"{n}-{c}" for n, c in ALL_CASES])
def test_compiled_plans_equal_replayed_steps(name: str, cfg: dict[str, Any]) -> None:
    """Every registered solver (adaptive ones at fixed steps, stochastic ones with the same
    draws), compiled into fixed combinations once, gives what its replayed steps give:
    the coefficients come from its own step, so a solver whose step is not linear in its
    inputs would fail here."""
    solver = dp.get_solver(name, **cfg)
    for final, prediction in (("zero", "eps"), ("t_min", "v")):
        grid = dp.make_grid(SD, 6, final=final)  # type: ignore[arg-type]
        orders = solver.plan(
            steps=grid.steps, nfe=None, final_zero=grid.final_zero, lower_order_final=True
        )
        plan = probed_plan(solver, grid.knots, orders, SD)
        x = (
            torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            * grid.knots[0].sigma
        )

        def noise() -> SeededNoise | None:
            return SeededNoise([11, 12, 13]) if solver.stochastic else None

        replayed, calls = drive(OneEvaluationStepper(plan, SD), x, noise=noise())
        compiled, evals = run_compiled(plan, x, noise(), prediction)
        assert evals == calls
        assert torch.allclose(compiled, replayed, atol=1e-12, rtol=0), (final, prediction)


def test_compiled_multistep_steps_are_a_few_fused_terms() -> None:
    """DPM-Solver++(2M) in the middle of a run: the new data prediction is one register
    (sample + c * output) and the update three terms (state, newest and previous
    prediction); nothing is replayed."""
    solver = dp.get_solver("dpmpp_2m")
    grid = dp.make_grid(SD, 10, final="zero")
    plan = probed_plan(solver, grid.knots, [1] + [2] * 8 + [1], SD)
    program = compile_steps(plan, SD, lambda k: data_coefficients("eps", k.alpha, k.sigma))
    op = program.ops[5]
    assert len(op.result) == 3 and [len(c.terms) for c in op.store] == [2]
    assert op.store[0].terms[0] == (op.sample, 1.0)


def test_disabled_corrector_skips_one_correction_only() -> None:
    """A step marked ``corrector=False`` starts from the uncorrected state (diffusers'
    UniPC ``disable_corrector``); the next step corrects again."""
    solver = dp.get_solver("unipc", 2)
    grid = dp.make_grid(SD, 6, final="t_min")
    plan = probed_plan(solver, grid.knots, [1, 2, 2, 2, 2, 2], SD)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    full, _ = drive(OneEvaluationStepper(plan, SD), x)
    off = [dataclasses.replace(st, corrector=i != 3) for i, st in enumerate(plan)]
    skipped, _ = drive(OneEvaluationStepper(off, SD), x)
    compiled, _ = run_compiled(off, x)
    assert (skipped - full).abs().max() > 1e-6
    assert torch.allclose(compiled, skipped, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["unipc", "dpmpp_2m"])
def test_a_repeated_last_knot_corrects_and_moves_nothing(name: str) -> None:
    """diffusers' "sigma_min" Karras and flow grids repeat their last level: the step
    between the copies moves nothing, but a predictor-corrector solver uses the evaluation
    there to correct the previous step (as UniPCMultistepScheduler does); a solver without
    a corrector returns the state unchanged. Replayed and compiled agree."""
    solver = dp.get_solver(name)
    grid = dp.make_grid(SD, 20, "karras", final="t_min")
    knots = [*grid.knots, grid.knots[-1]]
    plan = probed_plan(solver, knots, [1] + [2] * 19 + [1], SD)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = x * knots[0].sigma
    states = []
    stepper = OneEvaluationStepper(plan, SD)
    for knot in stepper.evaluations:
        states.append(x)
        x = stepper.advance(DEN(x, knot), x)
    compiled, _ = run_compiled(plan, states[0])
    assert torch.allclose(compiled, x, atol=1e-12, rtol=0)
    if name == "unipc":
        # The correction moves the state towards the exact solution at the last knot
        # (measured: 3.6e-3 against 4.3e-3 uncorrected).
        exact = dp.reference_solve(DEN, states[0], knots[0], knots[-1], SD)
        assert (x - exact).abs().max() < 0.9 * (states[-1] - exact).abs().max()
    else:
        assert torch.equal(x, states[-1])


def test_grid_layout_puts_intermediate_points_on_the_grid() -> None:
    """A singlestep step of order k spanning k intervals of a log-SNR-uniform grid is the
    solver's own step with r = 1/k (DPM-Solver's defaults) on the coarse grid."""
    fine = dp.make_grid(SD, 12, "logsnr", final="t_min")
    for order, expected_r in ((2, (0.5,)), (3, (1 / 3, 2 / 3))):
        coarse = dp.TimeGrid(fine.knots[::order], SD)
        solver = dp.get_solver("dpmpp_singlestep", order)
        x = (
            torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            * fine.knots[0].sigma
        )
        ref = dp.solve(DEN, x, coarse, solver, orders=[order] * coarse.steps)
        plan = grouped_plan(solver, fine.knots, [order] * coarse.steps)
        assert plan[0].solver.r1 == pytest.approx(expected_r[0])  # type: ignore[attr-defined]
        assert [k.lam for st in plan for k in st.evals] == [k.lam for k in fine.knots[:-1]]
        out, calls = drive(OneEvaluationStepper(plan, PinnedSchedule(SD, fine.knots)), x)
        assert calls == ref.nfe == fine.steps
        assert torch.allclose(out, ref.x, atol=1e-12, rtol=0)


def test_pinned_schedule_returns_grid_knots_with_their_network_time() -> None:
    k = SD.knot(400.0)
    rounded = dp.Knot(k.t + 0.3, k.lam, k.alpha, k.sigma, 400.0)
    pinned = PinnedSchedule(SD, [rounded, SD.zero_knot()])
    assert pinned.knot_at_lambda(k.lam * (1 + 1e-13)) is rounded
    other = pinned.knot_at_lambda(k.lam + 0.1)
    assert other.model_t != 400.0 and other == SD.knot_at_lambda(k.lam + 0.1)
    assert pinned.knot_at_lambda(math.inf) == SD.zero_knot()


@dataclass(frozen=True)
class NoisyTwoStage(SinglestepSolver):
    """A toy stochastic singlestep solver (test only): two evaluations and two noise draws
    per step, to check that replays reuse the draws."""

    stochastic = True
    order: int = 2

    def step(self, ctx: StepContext, x: Tensor, x0: Tensor, state: Any) -> tuple[Tensor, Any]:
        mid = ctx.schedule.knot_at_lambda(0.5 * (ctx.s.lam + ctx.t.lam))
        assert ctx.noise is not None
        u = first_order_step(Form.DATA, x, x0, x0, ctx.s, mid) + 0.01 * ctx.noise(ctx.s, mid)
        x0_mid = ctx.evaluate(u, mid)
        out = first_order_step(Form.DATA, x, x0, x0_mid, ctx.s, ctx.t)
        out = out + 0.01 * ctx.noise(mid, ctx.t)
        return out, state


def test_noise_draws_are_replayed_not_redrawn() -> None:
    grid = dp.make_grid(SD, 4, final="t_min")
    solver = NoisyTwoStage()
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def source(seed: int) -> Any:
        gen = torch.Generator().manual_seed(seed)
        draws: list[Tensor] = []

        def draw(like: Tensor, a: dp.Knot, b: dp.Knot) -> Tensor:
            draws.append(torch.randn(like.shape, generator=gen, dtype=like.dtype))
            return draws[-1]

        return draw, draws

    ref_draw, ref_draws = source(7)
    expected = dp.solve(DEN, x, grid, solver, orders=[2] * grid.steps, noise_sampler=ref_draw)
    plan = probed_plan(solver, grid.knots, [2] * grid.steps, SD)
    draw, draws = source(7)
    out, calls = drive(OneEvaluationStepper(plan, SD), x, noise=draw)
    assert calls == 2 * grid.steps
    assert len(draws) == len(ref_draws) == 2 * grid.steps  # not one more per replay
    assert torch.allclose(out, expected.x, atol=1e-12, rtol=0)


def test_stochastic_solver_without_noise_source_is_refused() -> None:
    grid = dp.make_grid(SD, 2, final="t_min")
    plan = probed_plan(NoisyTwoStage(), grid.knots, [2, 2], SD)
    stepper = OneEvaluationStepper(plan, SD)
    x = torch.zeros(1, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="stochastic: a noise source is required"):
        stepper.advance(DEN(x, grid.knots[0]), x)


def test_inversion_into_pure_noise_returns_the_noise_prediction() -> None:
    """A flow schedule's sigma = 1 is lambda = -inf: the step into it is x = eps_hat, the
    mirror image of the data-prediction step into sigma = 0."""
    flow = dp.RectifiedFlowSchedule()
    knots = [flow.knot(0.2), flow.knot(0.6), flow.knot(1.0)]
    plan = probed_plan(dp.get_solver("dpmpp_2m"), knots, [2, 2], flow)
    assert [st.order for st in plan] == [2, 1]
    x = torch.randn(2, 6, dtype=torch.float64)
    den = dp.MixtureDenoiser(MIX)
    out, _ = drive(OneEvaluationStepper(plan, flow), x, denoiser=den)
    assert torch.isfinite(out).all()
    mid = plan[0]
    x1 = dp.solve(den, x, dp.TimeGrid((mid.s, mid.t), flow), mid.solver).x
    assert torch.allclose(
        out, dp.to_noise(den(x1, knots[1]), x1, knots[1].alpha, knots[1].sigma), atol=1e-12
    )


def test_plans_refuse_what_they_cannot_do() -> None:
    knots = dp.make_grid(SD, 4, final="zero").knots
    with pytest.raises(ValueError, match="do not cover"):
        grouped_plan(dp.get_solver("dpmpp_2s"), knots, [2, 1])
    with pytest.raises(ValueError, match="cannot start at pure noise or end at sigma = 0"):
        grouped_plan(dp.get_solver("dpmpp_2s"), knots, [2, 2])
    with pytest.raises(ValueError, match="r1/r2"):
        grouped_plan(NoisyTwoStage(), knots, [2, 2])
    assert supports_fractions(dp.get_solver("dpmpp_fast")) and not supports_fractions(
        dp.get_solver("dpmpp_2m")
    )
    stepper = OneEvaluationStepper(probed_plan(dp.get_solver("ddim"), knots, [1] * 4, SD), SD)
    drive(stepper, torch.zeros(1, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="all planned steps are done"):
        stepper.advance(torch.zeros(1, 6), torch.zeros(1, 6))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lof", [True, False])
@pytest.mark.parametrize("final_zero", [True, False])
def test_singlestep_groups_cover_the_grid(order: int, lof: bool, final_zero: bool) -> None:
    for n in range(1, 12):
        groups = singlestep_groups(n, order, lower_order_final=lof, final_zero=final_zero)
        assert sum(groups) == n and all(1 <= g <= order for g in groups)
        if final_zero:
            assert groups[-1] == 1


def test_diffusers_stays_optional() -> None:
    """Without diffusers, dpmsolver and the k-diffusion front end import, and the scheduler
    module says how to get it (run in a fresh interpreter with diffusers blocked)."""
    code = (
        "import sys\n"
        "sys.modules['diffusers'] = None\n"
        "import dpmsolver, dpmsolver.frontends, dpmsolver.frontends.kdiffusion\n"
        "try:\n"
        "    import dpmsolver.frontends.diffusers_scheduler\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR:', e)\n"
    )
    src = str(Path(dp.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR:" in out.stdout and "pip install diffusers" in out.stdout
