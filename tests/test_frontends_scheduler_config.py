"""How the diffusers scheduler reads a config and a solver name: the mapping rules
(config family x solver), ``solver="auto"``, one-line errors, and inference mode.

Agreement with diffusers' own schedulers is tests/test_frontends_diffusers.py's; the
full config x solver matrix is tests/test_frontends_matrix.py's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import dpmsolver as dp
from dpmsolver.auto import recommend

diffusers = pytest.importorskip("diffusers")
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from dpmsolver.frontends.diffusers_scheduler import (  # noqa: E402
    DPMSolverInverseScheduler,
    DPMSolverScheduler,
    solver_family,
)

diffusers_logging.set_verbosity_error()
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
    pytest.mark.filterwarnings("ignore::FutureWarning:diffusers"),
]

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
NAMES = [*dp.REGISTRY, *dp.solvers.ALIASES]


def default_order(name: str) -> int:
    if name in dp.solvers.ALIASES:
        base, fixed = dp.solvers.ALIASES[name]
        return int(fixed.get("order", dp.REGISTRY[base].default_order))
    return dp.REGISTRY[name].default_order


def run(scheduler: Any, steps: int, x: Tensor | None = None, **kw: Any) -> Tensor:
    """A pipeline's loop with a smooth stand-in network."""
    scheduler.set_timesteps(steps, **kw)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) if x is None else x
    for t in scheduler.timesteps:
        x = scheduler.step(0.3 * x + 0.1, t, x, generator=torch.Generator().manual_seed(1))
        x = x.prev_sample
    return x


# --------------------------------------------------------------------------------------
# Mapping rules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_config_of_another_family_leaves_the_solver_its_own_order(name: str) -> None:
    """Configs of DPM-Solver (multistep, singlestep), UniPC and DEIS with a non-default
    ``solver_order``: a solver of another family runs at its own default order; one of the
    same family takes the config's order where it accepts it (an alias that fixes the
    order keeps its own)."""
    configs = {
        "dpmsolver_multistep": diffusers.DPMSolverMultistepScheduler(**SD, solver_order=3),
        "dpmsolver_singlestep": diffusers.DPMSolverSinglestepScheduler(**SD, solver_order=1),
        "unipc": diffusers.UniPCMultistepScheduler(**SD, solver_order=3, solver_type="bh1"),
        "deis": diffusers.DEISMultistepScheduler(**SD, solver_order=1),
    }
    for family, peer in configs.items():
        order = peer.config.solver_order
        scheduler = DPMSolverScheduler.from_config(peer.config, solver=name)
        accepted = dp.REGISTRY[dp.solvers.ALIASES.get(name, (name, {}))[0]].orders
        fixed = "order" in dp.solvers.ALIASES.get(name, ("", {}))[1]
        if solver_family(name) == family and order in accepted and not fixed:
            expected = order
        else:
            expected = default_order(name)
        got = scheduler.solver.order
        assert got == expected, (name, family, got, expected)


def test_the_issue_examples() -> None:
    """Issue #13: unipc from every config (the default solver_type "midpoint" is not
    UniPC's); ddim / pndm / euler_ancestral from a DPM-Solver config (its order is not
    theirs); lms / ipndm / dpm_fast keep their own order; "auto" is accepted."""
    dpm = diffusers.DPMSolverMultistepScheduler(**SD).config
    for config in (dpm, diffusers.PNDMScheduler(**SD).config, DPMSolverScheduler().config):
        unipc = DPMSolverScheduler.from_config(config, solver="unipc")
        assert unipc.solver == dp.get_solver("unipc")  # bh2, order 2, corrector on
    expected = {"ddim": 1, "pndm": 4, "euler_ancestral": 1, "lms": 4, "ipndm": 4, "dpm_fast": 3}
    for name, order in expected.items():
        assert DPMSolverScheduler.from_config(dpm, solver=name).solver.order == order
    assert run(DPMSolverScheduler.from_config(dpm, solver="auto"), 8).isfinite().all()


def test_a_peer_config_selects_its_algorithm_with_its_options() -> None:
    unipc = diffusers.UniPCMultistepScheduler(
        **SD, solver_order=3, solver_type="bh1", predict_x0=False, disable_corrector=[2]
    )
    ours = DPMSolverScheduler.from_config(unipc.config)
    assert ours.config.solver == "unipc"
    assert ours.solver == dp.get_solver("unipc", 3, variant="bh1", form="noise")
    assert ours.config.disable_corrector == [2] and ours.config.lower_order_final_always
    assert ours.config.grid_convention == "unipc"
    # The same config with a DPM-Solver solver: diffusers' reading of bh1 (midpoint), the
    # solver's own order, no UniPC options; the grid is still the config's.
    other = DPMSolverScheduler.from_config(unipc.config, solver="dpmpp_multistep")
    assert other.solver == dp.get_solver("dpmpp_multistep")
    assert other.config.disable_corrector == [] and not other.config.lower_order_final_always
    assert other.config.grid_convention == "unipc"

    deis = diffusers.DEISMultistepScheduler(**SD, solver_order=3)
    ours = DPMSolverScheduler.from_config(deis.config)
    assert ours.solver == dp.get_solver("deis", 3)
    assert ours.config.final_sigmas_type == "sigma_min"  # DEIS ends at t = 0, never at 0
    two = DPMSolverScheduler.from_config(deis.config, solver="dpmpp_2m")
    assert two.solver.order == 2 and two.config.final_sigmas_type == "sigma_min"

    # DPM-Solver's second-order form carries across its schedulers; the singlestep order
    # does not reach the multistep solver (another algorithm), nor DPM-Solver-fast.
    single = diffusers.DPMSolverSinglestepScheduler(**SD, solver_order=3, solver_type="heun")
    ours = DPMSolverScheduler.from_config(single.config, solver="dpmpp_multistep")
    assert ours.solver == dp.get_solver("dpmpp_multistep", variant="heun")
    assert DPMSolverScheduler.from_config(single.config, solver="dpm_3s").solver.order == 3
    fast = DPMSolverScheduler.from_config(single.config, solver="dpmpp_fast")
    assert fast.solver == dp.get_solver("dpmpp_fast", variant="heun")


def test_explicit_arguments_win_over_the_config() -> None:
    dpm = diffusers.DPMSolverMultistepScheduler(**SD, solver_order=3).config
    assert DPMSolverScheduler.from_config(dpm, solver="unipc", solver_order=3).solver.order == 3
    bh1 = DPMSolverScheduler.from_config(dpm, solver="unipc", solver_type="bh1")
    assert bh1.solver == dp.get_solver("unipc", variant="bh1")
    # An alias fixes what it fixes, whatever solver_type the config carries.
    unipc_cfg = diffusers.UniPCMultistepScheduler(**SD, solver_type="bh2").config
    assert DPMSolverScheduler.from_config(unipc_cfg, solver="unipc_bh1").solver.variant == "bh1"
    with pytest.raises(ValueError, match="has order 2"):
        DPMSolverScheduler.from_config(dpm, solver="dpmpp_2m", solver_order=3)


def test_a_saved_config_records_what_runs_and_switches_like_a_peer_config() -> None:
    """Our own config records the order and solver_type actually used, so it loads into
    the peer scheduler of that algorithm; switched to another solver it follows the same
    family rules as a diffusers config."""
    ours = DPMSolverScheduler(solver="unipc_bh1", solver_order=3, **SD)
    assert ours.config.solver_order == 3 and ours.config.solver_type == "bh1"
    peer = diffusers.UniPCMultistepScheduler.from_config(ours.config)
    assert peer.config.solver_type == "bh1" and peer.config.solver_order == 3
    switched = DPMSolverScheduler.from_config(ours.config, solver="dpmpp_2s")
    assert switched.solver == dp.get_solver("dpmpp_2s")
    again = DPMSolverScheduler.from_config(ours.config, solver="unipc")
    assert again.solver == dp.get_solver("unipc", 3, variant="bh1")


def test_adaptive_solvers_run_their_update_at_fixed_steps() -> None:
    """DPM-Solver-23 on a pipeline's fixed timesteps is DPM-Solver-3's update there (the
    error control needs a loop that picks the steps)."""
    adaptive = DPMSolverScheduler(solver="dpmpp_adaptive", **SD)
    fixed = DPMSolverScheduler(solver="dpmpp_3s", **SD)
    assert torch.equal(run(adaptive, 9), run(fixed, 9))


# --------------------------------------------------------------------------------------
# solver="auto"
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_auto_resolves_the_recipe_for_the_budget_and_guidance(guidance: float) -> None:
    """``solver="auto"``: at each ``set_timesteps`` the policy's recipe for that many
    network evaluations at the configured ``guidance_scale``: its solver, grid and end,
    spending the budget exactly (one evaluation per timestep)."""
    config = diffusers.PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1).config
    scheduler = DPMSolverScheduler.from_config(config, solver="auto", guidance_scale=guidance)
    for nfe in (1, 3, 5, 6, 8, 10, 20):
        scheduler.set_timesteps(nfe)
        recipe = recommend(nfe, guidance)
        plan = recipe.plan(scheduler.schedule, nfe=nfe)
        assert scheduler.solver == recipe.build_solver()
        assert len(scheduler.timesteps) == nfe == plan.nfe
        assert scheduler.knots == list(plan.grid.knots)
    assert torch.isfinite(run(scheduler, 6)).all()


def test_auto_on_configs_it_does_not_plan_the_grid_for() -> None:
    """Flow configs, custom timesteps and inversion keep their grid; the recipe's solver
    runs on it, one evaluation per timestep."""
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    scheduler = DPMSolverScheduler.from_config(flow, solver="auto")
    scheduler.set_timesteps(8)
    assert len(scheduler.timesteps) == 8
    assert scheduler.solver == recommend(8, 7.5).build_solver()
    custom = DPMSolverScheduler(solver="auto", **SD)
    custom.set_timesteps(timesteps=[999, 800, 600, 400, 200])
    assert custom.timesteps.tolist() == [999, 800, 600, 400, 200]
    inverse = DPMSolverInverseScheduler(solver="auto", **SD)
    assert torch.isfinite(run(inverse, 10)).all() and len(inverse.timesteps) == 10


# --------------------------------------------------------------------------------------
# Errors and accepted values
# --------------------------------------------------------------------------------------

BAD_CALLS = {
    "too many steps": lambda: DPMSolverScheduler().set_timesteps(2000),
    "too many leading": lambda: DPMSolverScheduler(timestep_spacing="leading").set_timesteps(1000),
    "order": lambda: DPMSolverScheduler(solver="unipc", solver_order=4),
    "alias order": lambda: DPMSolverScheduler(solver="dpmpp_2m", solver_order=3),
    "option": lambda: DPMSolverScheduler(solver_options={"bogus": 1}),
    "reversed": lambda: DPMSolverScheduler().set_timesteps(timesteps=[*range(999, 0, -1), 500]),
    "steps type": lambda: DPMSolverScheduler().set_timesteps(2.5),  # type: ignore[arg-type]
    "prediction": lambda: DPMSolverScheduler(prediction_type="flow"),
    "spacing": lambda: DPMSolverScheduler(timestep_spacing="uniform"),
    "not set": lambda: DPMSolverScheduler().step(torch.zeros(1), 1, torch.zeros(1)),
    "auto order": lambda: DPMSolverScheduler(solver="auto", solver_order=2),
    "solver": lambda: DPMSolverScheduler(solver="euler_maruyama"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_errors_are_one_line_naming_the_parameter(case: str) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        BAD_CALLS[case]()
    message = str(info.value)
    assert "\n" not in message
    # The solver list is every registered name; everything else is short.
    assert len(message) < (700 if case == "solver" else 200), message


def test_too_many_steps_names_the_largest_that_works() -> None:
    with pytest.raises(ValueError) as info:
        DPMSolverScheduler().set_timesteps(2000)
    assert str(info.value) == (
        "num_inference_steps=2000 is more than timestep_spacing='linspace' spaces distinctly "
        "over 1000 training timesteps; use at most 999"
    )
    DPMSolverScheduler().set_timesteps(999)
    DPMSolverScheduler(timestep_spacing="trailing").set_timesteps(1000)
    # Noise-level grids and flow grids are not limited by the integer timesteps.
    DPMSolverScheduler(use_karras_sigmas=True).set_timesteps(1500)


def test_diffusers_accepted_values_are_accepted() -> None:
    """Values diffusers' schedulers take: thresholding below 1, every spacing and final
    type, Beta sigmas (with scipy), DDPM's variance types, UniPC's and DEIS' names."""
    pytest.importorskip("scipy")
    for kwargs in (
        {"thresholding": True, "sample_max_value": 0.5},
        {"timestep_spacing": "leading", "steps_offset": 1},
        {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"},
        {"use_beta_sigmas": True},
        {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
        {"variance_type": "fixed_small_log"},
        {"solver_type": "logrho"},
        {"solver_type": "bh2", "solver": "dpmpp_3s"},
        {"prediction_type": "flow_prediction", "use_beta_sigmas": True},
    ):
        assert torch.isfinite(run(DPMSolverScheduler(**SD, **kwargs), 7)).all(), kwargs


# --------------------------------------------------------------------------------------
# Inference mode
# --------------------------------------------------------------------------------------


def test_step_keeps_no_graph_even_without_no_grad() -> None:
    """A caller that forgot ``torch.no_grad()``: the network output carries a graph, the
    scheduler's result and everything it keeps do not (nothing grows across steps)."""
    weight = torch.tensor(0.3, requires_grad=True)
    scheduler = DPMSolverScheduler(solver="unipc", solver_order=3, **SD)
    scheduler.set_timesteps(6)
    x = torch.randn(1, 4, 4, 4)
    for t in scheduler.timesteps:
        out = weight * x
        assert out.requires_grad
        x = scheduler.step(out, t, x).prev_sample
        assert not x.requires_grad and x.grad_fn is None
        stepper = scheduler._stepper
        assert stepper is not None
        assert not any(isinstance(r, Tensor) and r.requires_grad for r in stepper._registers)


def test_differentiable_keeps_the_graph() -> None:
    """``differentiable=True`` opts out: gradients flow through every step."""
    weight = torch.tensor(0.3, requires_grad=True)
    scheduler = DPMSolverScheduler(solver="dpmpp_2m", differentiable=True, **SD)
    scheduler.set_timesteps(5)
    x = torch.randn(1, 4, 4, 4)
    for t in scheduler.timesteps:
        x = scheduler.step(weight * x, t, x).prev_sample
    assert x.requires_grad
    x.sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad) and weight.grad != 0


# --------------------------------------------------------------------------------------
# Starting mid-way
# --------------------------------------------------------------------------------------


def test_a_start_inside_a_singlestep_step_finishes_it_first_order() -> None:
    """img2img may start at a solver-placed intermediate point (the pipeline slices
    ``timesteps[t_start * order:]``): that step's remaining points are taken as DDIM steps,
    then the plan continues, one evaluation per remaining timestep."""
    scheduler = DPMSolverScheduler(solver="dpmpp_3s", singlestep_layout="solver", **SD)
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) == 3 * 3 + 1
    for begin in range(len(scheduler.timesteps)):
        scheduler.set_begin_index(begin)
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
        calls = 0
        for t in scheduler.timesteps[begin:]:
            x = scheduler.step(0.3 * x, t, x).prev_sample
            calls += 1
        assert calls == len(scheduler.timesteps) - begin == scheduler.step_index - begin
        assert torch.isfinite(x).all()


def test_set_timesteps_reuses_its_plan_until_the_config_changes() -> None:
    """Pipelines set the same timesteps for every generation: the compiled plan is kept
    for repeated arguments, and rebuilt when the arguments or the config change."""
    scheduler = DPMSolverScheduler(solver="auto", **SD)
    scheduler.set_timesteps(8)
    first = scheduler._compiled[0]
    scheduler.set_timesteps(10)
    scheduler.set_timesteps(8)
    assert scheduler._compiled[0] is first
    scheduler.register_to_config(guidance_scale=1.0)
    scheduler.set_timesteps(8)
    assert scheduler._compiled[0] is not first
    assert scheduler.solver == recommend(8, 1.0).build_solver() != recommend(8, 7.5).build_solver()


def test_recorded_overhead_is_at_most_half_of_diffusers() -> None:
    """benchmarks/overhead.md (written by ``dpmsolver bench --only overhead``): per step,
    network excluded, the scheduler costs at most half of diffusers'
    DPMSolverMultistepScheduler on each latent shape. A benchmark's recorded output, not a
    timed test."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.md").read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| (")]
    shapes = {cells[0].strip() for cells in rows}
    assert shapes == {"(1, 4, 64, 64)", "(8, 4, 64, 64)", "(4, 4, 128, 128)"}
    for cells in rows:
        theirs, ours, ratio = float(cells[2]), float(cells[4]), float(cells[5])
        # The ratio is the median of paired runs' ratios; the medians per step agree.
        assert ratio <= 0.5 and ours / theirs <= 0.5, cells


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "dpmpp_3s", "dpmpp_2m_sde"])
def test_steps_after_the_first_never_read_tensors_on_the_host(name: str) -> None:
    """After the first ``step`` (which finds its timestep in ``timesteps``, as diffusers'
    schedulers do), a step is tensor updates only: every host read of a float32 tensor
    raises (a CPU-checkable proxy for CUDA synchronizations), thresholding included."""
    from .test_no_sync import forbid_host_reads

    scheduler = DPMSolverScheduler(solver=name, thresholding=True, **SD)
    scheduler.set_timesteps(10)
    x = torch.randn(2, 4, 4, 4)
    generator = torch.Generator().manual_seed(0)
    t0, *rest = scheduler.timesteps
    x = scheduler.step(0.3 * x, t0, x, generator=generator).prev_sample
    with forbid_host_reads():
        for t in rest:
            x = scheduler.step(0.3 * x, t, x, generator=generator).prev_sample
    assert torch.isfinite(x).all()
