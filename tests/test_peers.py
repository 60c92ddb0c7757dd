"""Side by side with the reference implementations: k-diffusion and diffusers.

Same exact model (a Gaussian mixture), same noise levels, float64 on both sides where the
peer allows it. Tolerances (max abs over a batch of states of size ~1):

- k-diffusion (float64 throughout): Euler, Heun, DPM-Solver++(2M) and LMS agree to 1e-10
  (observed ~1e-15; LMS's scipy quadrature is exact for its polynomials).
- diffusers with float64 noise levels (their ``sigmas`` / ``alphas_cumprod`` replaced by the
  float64 values of the same schedule, so their arithmetic runs in float64): UniPC, DEIS
  and PNDM agree to 1e-10 (observed ~1e-14). DPMSolverMultistepScheduler computes in
  float32 whatever the input, so it is held to 1e-5 (observed ~1e-6).

Where a peer differs on purpose, the test says why and checks what we do instead.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.solvers.linear_multistep import adams_weights

from .peers import KDenoiser, diffusers_schedule, kdiffusion_sampling

# diffusers' schedulers hand torch tensors to numpy, which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

MIX = dp.default_mixture(dim=6, num_classes=3, components_per_class=2, seed=1)
DEN = dp.MixtureDenoiser(MIX)
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TIGHT = 1e-10


def noise(b: int = 4) -> torch.Tensor:
    return torch.randn(b, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------
# k-diffusion
# --------------------------------------------------------------------------------------

K_SCHEDULES = {
    "vp_discrete": (dp.DiscreteVPSchedule(), "karras"),
    "edm": (dp.VESchedule(), "karras"),
    "vp_linear": (dp.ContinuousVPSchedule("linear"), "logsnr"),
}
K_PAIRS = [("euler", "sample_euler"), ("heun", "sample_heun"), ("dpmpp_2m", "sample_dpmpp_2m")]


def run_k(
    sampler: str, schedule: dp.NoiseSchedule, grid: dp.TimeGrid, x: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """k-diffusion's ``sampler`` on our grid's sigmas, from our state ``x``; returns the end
    state in our variables (``x = alpha x~``) and its number of model calls."""
    model = KDenoiser(DEN, schedule)
    sigmas = torch.tensor(grid.ksigmas, dtype=torch.float64)
    out = getattr(kdiffusion_sampling(), sampler)(
        model, x / grid.knots[0].alpha, sigmas, disable=True
    )
    return out * grid.knots[-1].alpha, model.calls


@pytest.mark.parametrize("schedule_name", list(K_SCHEDULES))
@pytest.mark.parametrize(("ours", "theirs"), K_PAIRS, ids=[p[0] for p in K_PAIRS])
@pytest.mark.parametrize("final", ["zero", "t_min"])
def test_kdiffusion_samplers_agree(ours: str, theirs: str, schedule_name: str, final: str) -> None:
    schedule, kind = K_SCHEDULES[schedule_name]
    grid = dp.make_grid(schedule, 12, kind, final=final)  # type: ignore[arg-type]
    x = noise() * grid.knots[0].sigma
    ref, calls = run_k(theirs, schedule, grid, x)
    r = dp.solve(DEN, x, grid, dp.get_solver(ours), lower_order_final=False)
    assert maxdiff(r.x, ref) < TIGHT
    assert r.nfe == calls


@pytest.mark.parametrize("schedule_name", list(K_SCHEDULES))
def test_kdiffusion_lms_agrees(schedule_name: str) -> None:
    """LMS (= our variable-step iPNDM) to the last noisy level: k-diffusion integrates the
    Lagrange basis with scipy's quad, we integrate it exactly."""
    schedule, kind = K_SCHEDULES[schedule_name]
    grid = dp.make_grid(schedule, 12, kind, final="t_min")  # type: ignore[arg-type]
    x = noise() * grid.knots[0].sigma
    ref, calls = run_k("sample_lms", schedule, grid, x)
    r = dp.solve(DEN, x, grid, dp.get_solver("lms"), lower_order_final=False)
    assert maxdiff(r.x, ref) < TIGHT and r.nfe == calls == 12


def test_kdiffusion_lms_integrates_into_sigma_zero_like_ours() -> None:
    """Adams-Bashforth in sigma~ is regular at sigma~ = 0, so LMS (``steps_into_zero``)
    keeps its order on the last step, as k-diffusion's ``sample_lms`` does: the runs agree
    through the final step, which is not the plain data prediction."""
    schedule, kind = K_SCHEDULES["vp_discrete"]
    grid = dp.make_grid(schedule, 12, kind, final="zero")  # type: ignore[arg-type]
    x = noise() * grid.knots[0].sigma
    model = KDenoiser(DEN, schedule)
    sigmas = torch.tensor(grid.ksigmas, dtype=torch.float64)
    theirs = kdiffusion_sampling().sample_lms(model, x / grid.knots[0].alpha, sigmas, disable=True)
    r = dp.solve(
        DEN, x, grid, dp.get_solver("lms"), lower_order_final=False, return_intermediates=True
    )
    assert r.trajectory is not None and r.orders[-1] == 4
    assert maxdiff(r.x, theirs) < TIGHT
    assert maxdiff(r.x, DEN(r.trajectory[-2], grid.knots[-2])) > 1e-6


# --------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------


def diffusers_module() -> Any:
    return pytest.importorskip("diffusers")


def run_diffusers(
    scheduler: Any, steps: int, x: torch.Tensor
) -> tuple[torch.Tensor, dp.DiscreteVPSchedule, list[int], list[torch.Tensor], int]:
    """Drive ``scheduler`` with the exact eps of our mixture on its own timesteps, with its
    noise levels replaced by float64 values of the same schedule. Returns the end state,
    our schedule on the scheduler's ``alphas_cumprod``, the timesteps, the state before
    every ``step`` call, and the number of model calls."""
    schedule = diffusers_schedule(scheduler)
    acp = schedule.alphas_cumprod
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps
    if hasattr(scheduler, "sigmas"):
        sig = scheduler.sigmas.to(torch.float64)
        exact = ((1 - acp[ts]) / acp[ts]).sqrt()
        assert torch.allclose(sig[: len(ts)], exact, rtol=1e-6)  # only float32 rounding differs
        sig[: len(ts)] = exact
        if sig[-1] != 0:  # final_sigmas_type="sigma_min": the clean end of the schedule, t = 0
            sig[-1] = ((1 - acp[0]) / acp[0]).sqrt()
        scheduler.sigmas = sig
    else:  # PNDM works on alphas_cumprod directly
        scheduler.alphas_cumprod = acp.clone()
        scheduler.final_alpha_cumprod = (
            acp[0].clone()
            if not scheduler.config.set_alpha_to_one
            else torch.tensor(1.0, dtype=torch.float64)
        )
    net = dp.MixtureNetwork(MIX, schedule, "eps")
    states = []
    for t in ts:
        states.append(x)
        x = scheduler.step(net(x, t.reshape(1).expand(x.shape[0])), t, x).prev_sample
    return x, schedule, [int(t) for t in ts], states, net.calls


def run_ours(
    schedule: dp.NoiseSchedule,
    timesteps: list[int],
    final: str,
    solver: dp.solvers.Solver,
    x: torch.Tensor,
    lower_order_final: bool | None = None,
) -> dp.SampleResult:
    """Ours on the same noise levels: the scheduler's timesteps, then sigma = 0 (``"zero"``)
    or the schedule's clean end t = 0 (``"t_min"``)."""
    net = dp.MixtureNetwork(MIX, schedule, "eps")
    if final == "zero":
        grid = dp.grid_from_timesteps(schedule, timesteps, final="zero")
    else:
        grid = dp.grid_from_timesteps(schedule, [*timesteps, 0], final="t_min")
    return dp.solve(
        dp.build_denoiser(net),
        x,
        grid,
        solver,
        lower_order_final=lower_order_final,
        return_intermediates=True,
    )


UNIPC_CASES = [
    (order, variant, form, final)
    for order in (1, 2, 3)
    for variant in ("bh1", "bh2")
    for form in ("data", "noise")
    for final in ("zero", "sigma_min")
]


def unipc_nan_at_zero(variant: str, form: str, final: str) -> bool:
    """diffusers' UniPC into sigma = 0 evaluates B(h) or phi_1 at h = inf: 0 * inf = NaN for
    bh1 (B = h) and for the noise form (expm1(h))."""
    return final == "zero" and (variant == "bh1" or form == "noise")


@pytest.mark.parametrize(("order", "variant", "form", "final"), UNIPC_CASES)
@pytest.mark.parametrize("steps", [7, 16])
def test_diffusers_unipc_agrees(
    order: int, variant: str, form: str, final: str, steps: int
) -> None:
    sch = diffusers_module().UniPCMultistepScheduler(
        solver_order=order,
        solver_type=variant,
        predict_x0=form == "data",
        final_sigmas_type=final,
        **SD_BETAS,
    )
    x = noise()
    theirs, schedule, ts, states, calls = run_diffusers(sch, steps, x)
    solver = dp.get_solver("unipc", order, variant=variant, form=form)
    # diffusers lowers the order of the last steps whatever their number
    ours = run_ours(
        schedule, ts, "zero" if final == "zero" else "t_min", solver, x, lower_order_final=True
    )
    assert ours.nfe == calls and torch.isfinite(ours.x).all()
    if unipc_nan_at_zero(variant, form, final):
        # Deliberate difference: ours is the loop's data-prediction step x = D(x), finite,
        # from the same last noisy state as diffusers'.
        assert torch.isnan(theirs).any()
        assert ours.trajectory is not None
        assert maxdiff(ours.trajectory[-2], states[-1]) < TIGHT
        assert ours.denoised is not None and torch.equal(ours.x, ours.denoised[-1])
    else:
        assert maxdiff(ours.x, theirs) < TIGHT


def _ode_tau(t: Any) -> float:
    return 0.0


@pytest.mark.parametrize(
    ("predictor", "corrector", "ours"),
    [
        (2, 2, {"order": 2, "variant": "bh1", "corrector_order": 2}),
        (1, 2, {"order": 1, "variant": "bh1"}),
        (3, 3, {"order": 3, "variant": "bh1", "corrector_order": 3}),
    ],
)
@pytest.mark.parametrize("steps", [7, 16])
def test_diffusers_sa_solver_ode_agrees(
    predictor: int, corrector: int, ours: dict[str, Any], steps: int
) -> None:
    """diffusers' SA-Solver with tau = 0 (the ODE) is UniPC with SA-Solver's corrector order
    and, at order 2, B(h) = h (the O(h^3) term it adds): solvers/unipc.py. It ends at the
    schedule's t = 0 and lowers the last orders."""
    sch = diffusers_module().SASolverScheduler(
        predictor_order=predictor, corrector_order=corrector, tau_func=_ode_tau, **SD_BETAS
    )
    x = noise()
    theirs, schedule, ts, _, calls = run_diffusers(sch, steps, x)
    solver = dp.get_solver("unipc", **ours)
    mine = run_ours(schedule, ts, "t_min", solver, x, lower_order_final=True)
    assert mine.nfe == calls and maxdiff(mine.x, theirs) < TIGHT
    # the alias names the order-2 ODE form
    assert dp.get_solver("sa_solver_ode") == dp.get_solver("unipc", **ours) or predictor != 2


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [8, 20])
def test_diffusers_deis_agrees(order: int, spacing: str, steps: int) -> None:
    """diffusers' DEIS ends at the schedule's t = 0 (its ``sigma_last``) and lowers the final
    orders only below 15 steps, as our default does."""
    sch = diffusers_module().DEISMultistepScheduler(
        solver_order=order, timestep_spacing=spacing, **SD_BETAS
    )
    x = noise()
    theirs, schedule, ts, _, calls = run_diffusers(sch, steps, x)
    ours = run_ours(schedule, ts, "t_min", dp.get_solver("deis", order), x)
    assert maxdiff(ours.x, theirs) < TIGHT and ours.nfe == calls


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("steps", [8, 20])
def test_diffusers_dpmsolver_multistep_agrees(order: int, final: str, steps: int) -> None:
    """Reference for the existing DPM-Solver++ (diffusers computes in float32: 1e-5)."""
    sch = diffusers_module().DPMSolverMultistepScheduler(
        solver_order=order, final_sigmas_type=final, **SD_BETAS
    )
    x = noise()
    theirs, schedule, ts, _, calls = run_diffusers(sch, steps, x)
    ours = run_ours(
        schedule,
        ts,
        "zero" if final == "zero" else "t_min",
        dp.get_solver("dpmpp_multistep", order),
        x,
    )
    assert maxdiff(ours.x, theirs) < 1e-5 and ours.nfe == calls


PNDM_GRIDS = [("leading", 6), ("leading", 10), ("leading", 20), ("trailing", 10), ("trailing", 20)]


@pytest.mark.parametrize("warmup", ["prk", "heun"])
@pytest.mark.parametrize(("spacing", "steps"), PNDM_GRIDS)
def test_diffusers_pndm_agrees(warmup: str, spacing: str, steps: int) -> None:
    """PNDM (pseudo Runge-Kutta warm-up) and PLMS (``skip_prk_steps=True``).

    diffusers' PNDM moves every step from t to ``t - num_train_timesteps // steps`` (and
    puts the Runge-Kutta midpoints half that far), whatever its ``timestep_spacing``; that
    is its own grid only for "leading" spacing (its default) and for "trailing" when
    ``steps`` divides 1000, so only those are compared. With "linspace" the state lands
    on one noise level and the model is next told another (999 -> 899, then t = 888); ours
    always steps between the levels it evaluates at. diffusers' last step goes from the
    last timestep to ``alphas_cumprod[0]``: t = 0, a no-op after "leading" timesteps that
    still costs a model call, which ours skips (our grid simply ends at t = 0).
    """
    sch = diffusers_module().PNDMScheduler(
        skip_prk_steps=warmup == "heun", timestep_spacing=spacing, **SD_BETAS
    )
    x = noise()
    theirs, schedule, _, _, calls = run_diffusers(sch, steps, x)
    ts = sorted({int(t) for t in sch._timesteps if t > 0}, reverse=True)  # its grid; t = 0 added
    ours = run_ours(schedule, ts, "t_min", dp.get_solver("pndm", warmup=warmup), x)
    assert maxdiff(ours.x, theirs) < TIGHT
    assert ours.nfe == calls - (1 if spacing == "leading" else 0)


# --------------------------------------------------------------------------------------
# Identities between peer methods and ours
# --------------------------------------------------------------------------------------

IDENTITIES: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    # DEIS integrates the Lagrange polynomial exactly: DPM-Solver's 2M in its Taylor
    # ("heun") form and our full-term 3M (with the same form for its order-2 warm-up step).
    ("deis", {"order": 2}, "dpm_multistep", {"order": 2, "variant": "heun"}),
    ("deis", {"order": 3}, "dpm_multistep", {"order": 3, "variant": "heun"}),
    # UniP with two or more unknowns solves for the same polynomial (B(h) cancels); with one
    # unknown and bh2 its rho = 1/2 is DPM-Solver++(2M)'s midpoint form.
    ("unipc", {"order": 3, "use_corrector": False}, "dpmpp_multistep", {"order": 3}),
    ("unipc", {"order": 2, "use_corrector": False}, "dpmpp_multistep", {"order": 2}),
    ("unipc", {"order": 3, "use_corrector": False, "form": "noise"}, "dpm_multistep", {"order": 3}),
    # Euler in (sigma~, x~) is DDIM.
    ("euler", {}, "dpmpp_multistep", {"order": 1}),
]


@pytest.mark.parametrize(
    ("a", "a_opts", "b", "b_opts"), IDENTITIES, ids=[f"{i[0]}={i[2]}-{i[1]}" for i in IDENTITIES]
)
def test_peer_method_equals_our_method(
    a: str, a_opts: dict[str, Any], b: str, b_opts: dict[str, Any]
) -> None:
    grid = dp.make_grid(dp.DiscreteVPSchedule(), 15, "time_uniform", final="zero")
    x = noise() * grid.knots[0].sigma
    ra = dp.solve(DEN, x, grid, dp.get_solver(a, **a_opts))
    rb = dp.solve(DEN, x, grid, dp.get_solver(b, **b_opts))
    assert ra.orders == rb.orders
    assert maxdiff(ra.x, rb.x) < 1e-12


def test_fixed_adams_weights_are_the_classical_ones_and_assume_equal_sigma_steps() -> None:
    """iPNDM / PLMS's fixed weights are the Adams-Bashforth table; on a grid uniform in
    sigma~ they are the variable-step weights, elsewhere the variable ones are closer to
    the exact solution."""
    table = [
        [1.0],
        [3 / 2, -1 / 2],
        [23 / 12, -16 / 12, 5 / 12],
        [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ]
    for k, row in enumerate(table, start=1):
        got = adams_weights([-float(j) for j in range(k)], 1.0, "fixed")
        assert got == pytest.approx(row, abs=1e-15)
        assert adams_weights([5.0 + j for j in range(k)], 4.0, "variable") == pytest.approx(
            [-w for w in row], abs=1e-13
        )
    sched = dp.DiscreteVPSchedule()
    fixed, variable = dp.get_solver("ipndm", coefficients="fixed"), dp.get_solver("ipndm")
    uniform = dp.make_grid(sched, 20, "karras", rho=1.0, final="t_min")  # uniform in sigma~
    x = noise() * uniform.knots[0].sigma
    assert (
        maxdiff(dp.solve(DEN, x, uniform, fixed).x, dp.solve(DEN, x, uniform, variable).x) < 1e-12
    )
    # Asymptotically (here 100 steps) the variable weights win; at 10-30 steps either can
    # be the closer one (see the module docstring of dpmsolver.solvers.linear_multistep).
    grid = dp.make_grid(sched, 100, "logsnr", t_end=50.0, final="t_min")
    exact = dp.reference_solve(DEN, x, grid.knots[0], grid.knots[-1], sched)
    e_fixed = maxdiff(dp.solve(DEN, x, grid, fixed).x, exact)
    e_variable = maxdiff(dp.solve(DEN, x, grid, variable).x, exact)
    assert e_variable < 0.5 * e_fixed, (e_variable, e_fixed)


@pytest.mark.parametrize(("order", "skip"), [(2, (0, 3, 9)), (3, (1, 2)), (2, (5,))])
def test_diffusers_unipc_disable_corrector_agrees(order: int, skip: tuple[int, ...]) -> None:
    """The core's ``corrector_skip`` is diffusers' ``disable_corrector``: the result of each
    listed step is left uncorrected, and it changes the end state."""
    sch = diffusers_module().UniPCMultistepScheduler(
        solver_order=order, disable_corrector=list(skip), **SD_BETAS
    )
    x = noise()
    theirs, schedule, ts, _, calls = run_diffusers(sch, 12, x)
    solver = dp.get_solver("unipc", order, corrector_skip=skip)
    ours = run_ours(schedule, ts, "zero", solver, x, lower_order_final=True)
    assert ours.nfe == calls and maxdiff(ours.x, theirs) < TIGHT
    plain = run_ours(schedule, ts, "zero", dp.get_solver("unipc", order), x, True)
    assert maxdiff(plain.x, theirs) > 1e3 * TIGHT


def test_corrector_skip_is_checked() -> None:
    """Step indices, each >= 0; any sequence is kept as a sorted tuple of distinct ints."""
    assert dp.get_solver("unipc", 2, corrector_skip=[3, 0, 3]).corrector_skip == (0, 3)
    for bad, error, match in (
        (1, ValueError, r"corrector_skip must be a sequence of step indices, got 1"),
        ("0", ValueError, r"corrector_skip must be a sequence"),
        ((0, -1), ValueError, r"corrector_skip\[1\] must be >= 0"),
        ((0.5,), TypeError, r"corrector_skip\[0\] must be an integer"),
    ):
        with pytest.raises(error, match=match):
            dp.get_solver("unipc", 2, corrector_skip=bad)


def test_corrector_order_is_checked() -> None:
    """SA-Solver's corrector order counts the new prediction: 2 to order + 1."""
    assert dp.get_solver("unipc", 3, corrector_order=4).claimed_order == 4.0
    for order, bad in ((2, 1), (2, 4), (1, 3)):
        with pytest.raises(ValueError, match="corrector_order"):
            dp.get_solver("unipc", order, corrector_order=bad)
