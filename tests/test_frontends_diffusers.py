"""The diffusers scheduler front end against diffusers' own schedulers, side by side on the
same exact network (``MixtureNetwork`` on the scheduler's schedule) and the same noise.

Every config is switched by ``from_config`` (naming the solver where the config is another
algorithm's). Where the algorithm is the same the results agree to 1e-5 over the whole
loop (diffusers computes its coefficients in float32; where that alone exceeds 1e-5,
diffusers runs on float64 levels and agrees to 1e-10); where we differ on purpose
(third-order multistep) ours is closer to the exact ODE solution. Comparisons with other
peers are one line each, see :func:`peer_case`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import dpmsolver as dp
from dpmsolver.parameterization import from_data

diffusers = pytest.importorskip("diffusers")
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from dpmsolver.frontends.diffusers_grid import singlestep_groups  # noqa: E402
from dpmsolver.frontends.diffusers_scheduler import (  # noqa: E402
    DPMSolverInverseScheduler,
    DPMSolverScheduler,
)

diffusers_logging.set_verbosity_error()
# diffusers' own deprecation notices (numpy 2's __array__ copy keyword, its deprecated
# algorithm_type="dpmsolver") are not about this code.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
    pytest.mark.filterwarnings("ignore::FutureWarning:diffusers"),
]

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
_BASE = dp.default_mixture(dim=16, num_classes=2, components_per_class=2, seed=3, shape=(1, 4, 4))
# Means doubled so that |x0| exceeds 1 and dynamic thresholding actually clips.
MIX = dataclasses.replace(_BASE, means=_BASE.means * 2)
PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}
THRESHOLD = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}
THRESHOLD_BELOW_1 = {
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.9,
    "sample_max_value": 0.8,
}


def noise(batch: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    return torch.randn(batch, 1, 4, 4, generator=torch.Generator().manual_seed(seed)).to(dtype)


Network = Callable[[Tensor, Tensor, int], Tensor]


def exact_network(scheduler: DPMSolverScheduler, mixture: dp.GaussianMixture = MIX) -> Network:
    """The mixture's exact prediction (``MixtureNetwork``'s) at the network time the
    pipeline passes. Noise levels are resolved once per time value: tiny tensor ops stall
    for milliseconds on busy CPUs, and this harness runs thousands of calls."""
    prediction = PREDICTION[scheduler.config.prediction_type]
    schedule = scheduler.schedule

    @functools.cache
    def levels(t: float) -> tuple[float, float]:
        k = schedule.knot(float(schedule.t_of_model_time(torch.tensor(t))))
        return k.alpha, k.sigma

    def call(x: Tensor, t: Tensor, i: int) -> Tensor:
        alpha, sigma = levels(float(t))
        x0 = mixture.x0(x, alpha, sigma).double()
        return from_data(x0, x.double(), alpha, sigma, prediction).to(x.dtype)  # type: ignore[arg-type]

    return call


def denoise(
    scheduler: Any,
    network: Network,
    x: Tensor,
    steps: int | None = None,
    stop: int | None = None,
    **kw: Any,
) -> Tensor:
    """A pipeline's loop: set the timesteps, then one network call and one step each."""
    scheduler.set_timesteps(steps, **kw)
    x = x * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps[:stop]):
        out = network(scheduler.scale_model_input(x, t), t, i)
        x = scheduler.step(out, t, x).prev_sample
    return x


@dataclasses.dataclass(frozen=True)
class PeerCase:
    """diffusers' ``peer`` scheduler built with ``config``; ours from its config with ``ours``."""

    peer: str
    config: dict[str, Any]
    ours: dict[str, Any]
    steps: int
    tol: float


def peer_case(
    peer: str, *, solver: str | None = None, steps: int = 10, tol: float = 1e-5, **config: Any
) -> Any:
    """One side-by-side comparison with diffusers' scheduler ``peer`` (a class name).

    ``solver`` names our solver when ``from_config`` should not infer it; the case is
    skipped while that solver is not registered. A comparison for a new peer solver is one
    line, e.g. ``peer_case("UniPCMultistepScheduler", solver="unipc", solver_order=2)``
    or ``peer_case("DEISMultistepScheduler", solver="deis", solver_order=3)``.
    """
    ours = {} if solver is None else {"solver": solver}
    registered = solver is None or solver in dp.REGISTRY or solver in dp.solvers.ALIASES
    label = f"{peer}-{steps}-" + ",".join(
        f"{k}={v}" for k, v in config.items() if k not in SD_BETAS
    )
    return pytest.param(
        PeerCase(peer, {**SD_BETAS, **config}, ours, steps, tol),
        id=label,
        marks=pytest.mark.skipif(not registered, reason=f"solver {solver!r} is not registered"),
    )


def side_by_side(
    case: PeerCase, x: Tensor | None = None
) -> tuple[Tensor, Tensor, DPMSolverScheduler]:
    peer = getattr(diffusers, case.peer)(**case.config)
    ours = DPMSolverScheduler.from_config(peer.config, **case.ours)
    net = exact_network(ours)
    x = noise() if x is None else x
    return denoise(peer, net, x, case.steps), denoise(ours, net, x, case.steps), ours


SPACINGS = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "logsnr": {"use_lu_lambdas": True},
}
# The singlestep scheduler has no use_lu_lambdas; its use_exponential_sigmas gives the same
# (with truncated network times).
# log-SNR-uniform grid, but truncates network times computed in float32, which puts its
# first one at 998 where ours is 999: it is compared on default and Karras spacings.
SINGLESTEP_SPACINGS = {"default": {}, "karras": {"use_karras_sigmas": True}}

CASES = (
    [
        peer_case(
            peer,
            solver_order=order,
            prediction_type=pred,
            final_sigmas_type=final,
            steps=steps,
            **spacing,
            **thr,
        )
        for peer, spacings, steps in (
            ("DPMSolverMultistepScheduler", SPACINGS, 10),
            ("DPMSolverSinglestepScheduler", SINGLESTEP_SPACINGS, 9),
        )
        for order in (1, 2)
        for pred in ("epsilon", "sample", "v_prediction")
        for spacing in spacings.values()
        for final in ("zero", "sigma_min")
        for thr in ({}, THRESHOLD)
    ]
    + [
        peer_case("DPMSolverMultistepScheduler", solver_type="heun", steps=12),
        peer_case("DPMSolverSinglestepScheduler", solver_type="heun", steps=8),
        # Third-order singlestep agrees in the "heun" (Taylor) form. In the "midpoint" form
        # diffusers computes the second intermediate point with its midpoint second-order
        # update, where DPM-Solver's Alg. 2 (and ours) uses the phi_2 form: both are third
        # order, and they differ by ~1e-3 at 9 steps.
        peer_case("DPMSolverSinglestepScheduler", solver_order=3, solver_type="heun", steps=9),
        peer_case(
            "DPMSolverSinglestepScheduler",
            solver_order=3,
            solver_type="heun",
            steps=12,
            final_sigmas_type="sigma_min",
        ),
        peer_case(
            "DPMSolverMultistepScheduler", algorithm_type="dpmsolver", final_sigmas_type="sigma_min"
        ),
        peer_case(
            "DPMSolverSinglestepScheduler",
            algorithm_type="dpmsolver",
            final_sigmas_type="sigma_min",
        ),
        peer_case(
            "DPMSolverMultistepScheduler", euler_at_final=True, final_sigmas_type="sigma_min"
        ),
        peer_case("DPMSolverMultistepScheduler", lower_order_final=False, steps=20),
        peer_case(
            "DPMSolverMultistepScheduler", timestep_spacing="leading", steps_offset=1, steps=7
        ),
        peer_case(
            "DPMSolverMultistepScheduler",
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            prediction_type="v_prediction",
            steps=8,
        ),
        peer_case(
            "DPMSolverMultistepScheduler",
            beta_schedule="linear",
            beta_start=0.0001,
            beta_end=0.02,
            steps=25,
        ),
        peer_case(
            "DPMSolverMultistepScheduler",
            beta_schedule="squaredcos_cap_v2",
            lambda_min_clipped=-5.1,
            prediction_type="v_prediction",
        ),
        peer_case(
            "DPMSolverMultistepScheduler",
            solver_order=1,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
        ),
        peer_case(
            "DPMSolverMultistepScheduler",
            solver_order=2,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
        ),
        peer_case("DPMSolverMultistepScheduler", solver_order=2, steps=1),
        peer_case("DPMSolverSinglestepScheduler", solver_order=2, steps=1),
        # diffusers accepts sample_max_value below 1: a fixed clip to [-max, max], rescaled.
        peer_case("DPMSolverMultistepScheduler", **THRESHOLD_BELOW_1),
        peer_case("DPMSolverSinglestepScheduler", **THRESHOLD_BELOW_1, steps=9),
        peer_case("DPMSolverMultistepScheduler", use_exponential_sigmas=True),
        peer_case("DPMSolverMultistepScheduler", use_beta_sigmas=True),
        peer_case("DPMSolverSinglestepScheduler", use_beta_sigmas=True, steps=9),
    ]
    + [
        # UniPC configs switched to solver="unipc": orders, B(h), x0 / eps prediction, the
        # corrector switched off at some steps, the lower-order rule at any number of steps,
        # and the corrector at the zero-length last step of a "sigma_min" Karras / flow grid.
        # Into sigma = 0 diffusers' bh1 and eps forms return NaN (tests/test_peers.py), so
        # those run with "sigma_min".
        peer_case("UniPCMultistepScheduler", solver="unipc", solver_order=order, steps=steps)
        for order, steps in ((1, 10), (2, 10), (3, 10), (2, 25), (3, 25))
    ]
    + [
        peer_case("UniPCMultistepScheduler", solver="unipc", **config)
        for config in (
            {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
            {"predict_x0": False, "solver_order": 3, "final_sigmas_type": "sigma_min"},
            {"disable_corrector": [0, 3, 9]},
            {"use_karras_sigmas": True},
            {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3},
            {"use_exponential_sigmas": True},
            {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"},
            {
                "timestep_spacing": "trailing",
                "rescale_betas_zero_snr": True,
                "prediction_type": "v_prediction",
            },
            {**THRESHOLD},
            {**THRESHOLD_BELOW_1},
            # Wan-style flow configs: UniPC's own flow levels (first at 1 - 1e-6).
            {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
            {
                "prediction_type": "flow_prediction",
                "use_flow_sigmas": True,
                "flow_shift": 5.0,
                "final_sigmas_type": "sigma_min",
            },
        )
    ]
    + [
        # DEIS configs switched to solver="deis"; DEIS ends at the least noisy training level.
        peer_case("DEISMultistepScheduler", solver="deis", **config)
        for config in (
            {"solver_order": 1},
            {"solver_order": 2},
            {"solver_order": 2, "steps": 20},
            {"solver_order": 3, "use_karras_sigmas": True},
            {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "steps": 8},
            {"timestep_spacing": "leading", "steps_offset": 1, "solver_order": 3},
            {"use_exponential_sigmas": True},
            {**THRESHOLD_BELOW_1},
        )
    ]
)


@pytest.mark.parametrize("case", CASES)
def test_reproduces_diffusers_where_the_algorithm_is_the_same(case: PeerCase) -> None:
    theirs, ours, scheduler = side_by_side(case)
    assert torch.isfinite(ours).all()
    assert scheduler.timesteps.tolist() == _peer_timesteps(case)
    assert (ours - theirs).abs().max().item() < case.tol


@pytest.mark.parametrize(
    "config",
    [
        {"solver_order": 3},
        {"solver_order": 3, "timestep_spacing": "trailing"},
        {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
    ],
    ids=["order-3", "order-3-trailing", "flow"],
)
def test_deis_is_diffusers_deis_on_float64_levels(config: dict[str, Any]) -> None:
    """Where diffusers' float32 coefficients alone differ from ours by 1-3e-5 (third-order
    DEIS over 20 steps, DEIS on flow sigmas), diffusers run on float64 noise levels of the
    same grid (ours) with float64 states agrees with ours to 1e-10: the algorithm is the same,
    the difference is diffusers' rounding."""
    peer = diffusers.DEISMultistepScheduler(**SD_BETAS, **config)
    ours = DPMSolverScheduler.from_config(peer.config, solver="deis")
    assert ours.config.final_sigmas_type == "sigma_min"  # where DEIS ends
    for s in (peer, ours):
        s.set_timesteps(20)
    assert ours.timesteps.tolist() == peer.timesteps.tolist()
    levels = torch.tensor([ours._level(k) for k in ours.knots], dtype=torch.float64)
    assert torch.allclose(levels, peer.sigmas.double(), rtol=1e-6, atol=1e-7)
    peer.sigmas = levels
    net = exact_network(ours)
    x = noise(dtype=torch.float64)
    theirs = x
    for i, t in enumerate(peer.timesteps):
        theirs = peer.step(net(theirs, t, i), t, theirs).prev_sample
    assert (denoise(ours, net, x, 20) - theirs).abs().max() < 1e-10


def test_sde_dpmsolver_draws_the_noise_diffusers_draws() -> None:
    """SDE-DPM-Solver++ (orders 1, 2) from an ``algorithm_type="sde-dpmsolver++"`` config:
    one ``randn_tensor`` per step with the pipeline's generator, as diffusers, so the same
    generator gives the same samples."""
    for order in (1, 2):
        peer = diffusers.DPMSolverMultistepScheduler(
            **SD_BETAS, algorithm_type="sde-dpmsolver++", solver_order=order
        )
        ours = DPMSolverScheduler.from_config(peer.config)
        assert ours.config.solver == "dpmpp_multistep_sde" and ours.solver.order == order
        net = exact_network(ours)
        outs = []
        for s in (peer, ours):
            s.set_timesteps(12)
            g, x = torch.Generator().manual_seed(3), noise()
            for i, t in enumerate(s.timesteps):
                x = s.step(net(x, t, i), t, x, generator=g).prev_sample
            outs.append(x)
        assert (outs[0] - outs[1]).abs().max() < 1e-5


def _peer_timesteps(case: PeerCase) -> list[Any]:
    peer = getattr(diffusers, case.peer)(**case.config)
    peer.set_timesteps(case.steps)
    return peer.timesteps.tolist()


def test_thresholding_cases_actually_clip() -> None:
    """The thresholding comparisons would be vacuous if the data never exceeded 1."""
    case = CASES[1].values[0]
    assert case.config.get("thresholding")
    _, clipped, _ = side_by_side(case)
    _, plain, _ = side_by_side(dataclasses.replace(case, config={**SD_BETAS, "solver_order": 1}))
    assert (clipped - plain).abs().max() > 0.05


def test_orders_follow_diffusers_lower_order_rules() -> None:
    """Multistep: warm-up, last steps lowered below 15 steps only; singlestep: diffusers'
    order list (a step of order k spans k timesteps)."""
    s = DPMSolverScheduler(solver="dpmpp_3m", **SD_BETAS)
    s.set_timesteps(8)
    assert [st.order for st in s._full_plan] == [1, 2, 3, 3, 3, 3, 2, 1]
    s.set_timesteps(16)
    assert [st.order for st in s._full_plan][-3:] == [3, 3, 1]
    peer = diffusers.DPMSolverSinglestepScheduler(solver_order=3, lower_order_final=True)
    for n in range(1, 13):
        for final_zero in (True, False):
            peer.register_to_config(
                final_sigmas_type="zero" if final_zero else "sigma_min", lower_order_final=True
            )
            listed = peer.get_order_list(n)
            groups = singlestep_groups(n, 3, lower_order_final=True, final_zero=final_zero)
            # diffusers lists each step's order at each of its timesteps: 1, 2, .., k.
            assert listed == [j + 1 for g in groups for j in range(g)]


def test_third_order_is_closer_to_the_exact_solution_than_diffusers() -> None:
    """Our 3M uses the full second-derivative term (third order); diffusers' (like the
    official code and k-diffusion) uses half of it and is second order. Same config, same
    network, same noise: diffusers equals our ``third_order="legacy"`` to 1e-5, and ours is
    closer to the exact ODE solution, increasingly so with more steps (the gain is
    asymptotic: on the mixtures we tried it is 1.1x-3.6x at 40 steps, and at 10 steps
    either may be ahead).

    The network is evaluated at the grid's own noise level (``scheduler.sigmas``) rather than
    at the rounded integer timestep, so that the ODE being solved is exactly the mixture's
    and ``reference_solve`` is its solution. The last step (to sigma = 0, first order in
    both) is not taken: the comparison is at the grid's last noisy knot. A smooth mixture
    (standard deviations x4, 0.2-1.2) keeps 20-40 steps in the asymptotic regime.
    """
    smooth = dataclasses.replace(_BASE, stds=_BASE.stds * 4)

    def at_grid_level(scheduler: Any) -> Network:
        def call(x: Tensor, t: Tensor, i: int) -> Tensor:
            s = float(scheduler.sigmas[i])
            alpha = 1.0 / math.sqrt(1.0 + s * s)
            x0 = smooth.x0(x, alpha, s * alpha)
            return from_data(x0.double(), x.double(), alpha, s * alpha, "eps").to(x.dtype)

        return call

    config = {**SD_BETAS, "solver_order": 3, "lower_order_final": False, "use_lu_lambdas": True}
    x = noise(8)
    ratios = {}
    for steps in (20, 40):
        peer = diffusers.DPMSolverMultistepScheduler(**config)
        ours = DPMSolverScheduler.from_config(peer.config)
        legacy = DPMSolverScheduler.from_config(
            peer.config, solver_options={"third_order": "legacy"}
        )
        theirs = denoise(peer, at_grid_level(peer), x, steps, stop=-1)
        mine = denoise(ours, at_grid_level(ours), x, steps, stop=-1)
        published = denoise(legacy, at_grid_level(legacy), x, steps, stop=-1)
        assert (theirs - published).abs().max() < 1e-5
        start, end = ours.knots[0], ours.knots[-2]
        ref = dp.reference_solve(dp.MixtureDenoiser(smooth), x.double(), start, end, ours.schedule)
        err_theirs = (theirs.double() - ref).abs().max().item()
        err_ours = (mine.double() - ref).abs().max().item()
        ratios[steps] = err_theirs / err_ours
    # Measured: 2.4x at 20 steps, 3.9x at 40 (orders 3 vs 2).
    assert ratios[20] > 1.8 and ratios[40] > 3.0 and ratios[40] > ratios[20]


@pytest.mark.parametrize("solver", ["dpmpp_2s", "dpmpp_3s", "dpm_2s", "dpmpp_fast"])
def test_solver_layout_equals_the_sampling_loop(solver: str) -> None:
    """With ``singlestep_layout="solver"`` the solver places its own intermediate points
    (inserted into ``timesteps``) and the replayed steps equal dp.solve exactly."""
    s = DPMSolverScheduler(solver=solver, singlestep_layout="solver", **SD_BETAS)
    s.set_timesteps(6)
    steps = len(s._full_plan)
    assert steps == 6 and len(s.timesteps) == sum(len(st.evals) for st in s._full_plan) > 6
    assert s.order == len(s._full_plan[0].evals)
    x = noise(dtype=torch.float64)
    net = dp.MixtureNetwork(dataclasses.replace(MIX), s.schedule)
    out = denoise(s, exact_network(s), x, 6)
    grid = dp.TimeGrid(tuple(s.knots), s.schedule)
    ref = dp.solve(
        dp.ModelDenoiser(net), x, grid, s.solver, orders=[st.order for st in s._full_plan]
    )
    assert ref.nfe == len(s.timesteps)
    # Not bit-exact only because timesteps are float32 (diffusers' convention), so the
    # network sees intermediate times rounded to float32.
    assert torch.allclose(out, ref.x, atol=1e-7, rtol=0)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_3s"])
def test_img2img_start_midway(solver: str) -> None:
    """``set_begin_index`` starts mid-grid (warm-up and singlestep grouping restart there);
    for the multistep solver this is exactly diffusers' behaviour."""
    s = DPMSolverScheduler(solver=solver, **SD_BETAS)
    s.set_timesteps(10)
    s.set_begin_index(4)
    x = noise()
    net = exact_network(s)
    calls = 0
    for i, t in enumerate(s.timesteps[4:]):
        x = s.step(net(x, t, i), t, x).prev_sample
        calls += 1
    assert calls == 6 and torch.isfinite(x).all()
    if solver == "dpmpp_2m":
        peer = diffusers.DPMSolverMultistepScheduler(**SD_BETAS)
        peer.set_timesteps(10)
        peer.set_begin_index(4)
        y = noise()
        for i, t in enumerate(peer.timesteps[4:]):
            y = peer.step(net(y, t, i), t, y).prev_sample
        assert (x - y).abs().max() < 1e-5


def test_inverse_reproduces_diffusers_inverse_and_round_trips() -> None:
    config = {**SD_BETAS, "solver_order": 2}
    data = MIX.sample(4, generator=torch.Generator().manual_seed(5)).float()
    peer = diffusers.DPMSolverMultistepInverseScheduler(**config)
    inverse = DPMSolverInverseScheduler.from_config(peer.config)
    net = exact_network(inverse)
    theirs = denoise(peer, net, data, 25)
    latents = denoise(inverse, net, data, 25)
    assert inverse.timesteps.tolist() == peer.timesteps.tolist()
    assert (latents - theirs).abs().max() < 1e-5
    forward = DPMSolverScheduler.from_config(peer.config, final_sigmas_type="sigma_min")
    forward.set_timesteps(25)
    assert forward.knots == inverse.knots[::-1]


KARRAS = {"use_karras_sigmas": True}


@pytest.mark.parametrize(
    ("solver", "extra", "tol"),
    [
        ("dpmpp_2m", KARRAS, 3e-3),
        ("dpmpp_3m", {"use_lu_lambdas": True}, 3e-3),
        ("dpmpp_2s", KARRAS, 3e-3),
        ("dpmpp_2m", {"prediction_type": "flow_prediction", "shift": 3.0, **KARRAS}, 3e-2),
    ],
)
def test_inversion_round_trip(solver: str, extra: dict[str, Any], tol: float) -> None:
    """Data -> noise with the inverse scheduler, noise -> data on the same grid: the data
    comes back up to the solvers' error, which shrinks with the steps (float64).

    Grids dense at low noise suit inversion (the default timestep spacing puts a step of
    1.7 in lambda next to the data, and a first-order warm-up step there). The flow grid
    ends at pure noise, reached by the first-order step ``x = eps_hat``; measured errors at
    40 steps: 9e-4 (2M), 6e-4 (3M), 1.5e-3 (2S), 1.7e-2 (flow).
    """
    betas = {} if "shift" in extra else SD_BETAS
    data = MIX.sample(4, generator=torch.Generator().manual_seed(6))
    errors = []
    for steps in (20, 40):
        inverse = DPMSolverInverseScheduler(solver=solver, **betas, **extra)
        forward = DPMSolverScheduler(solver=solver, final_sigmas_type="sigma_min", **betas, **extra)
        net = exact_network(inverse)
        latents = denoise(inverse, net, data, steps)
        assert torch.isfinite(latents).all()
        errors.append((denoise(forward, net, latents, steps) - data).abs().max().item())
    assert errors[1] < tol and errors[1] < errors[0] / 2


def test_flow_grids_match_flow_match_euler() -> None:
    """FlowMatchEuler configs (SD3's static shift; Flux's dynamic shift with mu and custom
    sigmas) give the same timesteps and noise levels."""
    cases = [
        ({"shift": 3.0}, {"num_inference_steps": 6}),
        (
            {"use_dynamic_shifting": True, "shift_terminal": 0.1},
            {"sigmas": np.linspace(1.0, 1 / 6, 6), "mu": 0.7},
        ),
        (
            {"use_dynamic_shifting": True, "time_shift_type": "linear"},
            {"sigmas": np.linspace(1.0, 1 / 5, 5), "mu": 1.2},
        ),
        ({"shift": 2.0, "use_karras_sigmas": True}, {"num_inference_steps": 7}),
    ]
    for config, call in cases:
        peer = diffusers.FlowMatchEulerDiscreteScheduler(**config)
        ours = DPMSolverScheduler.from_config(peer.config)
        assert ours.config.prediction_type == "flow_prediction"
        peer.set_timesteps(**call)
        ours.set_timesteps(**call)
        assert torch.allclose(ours.timesteps, peer.timesteps, rtol=1e-6, atol=1e-3)
        assert torch.allclose(ours.sigmas, peer.sigmas, rtol=1e-6, atol=1e-7)
        assert ours.sigmas[-1] == 0 and ours.timesteps.dtype == torch.float32


def test_forward_process_matches_diffusers() -> None:
    data, eps = noise(seed=1), noise(seed=2)
    peer = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True)
    ours = DPMSolverScheduler.from_config(peer.config)
    for s in (peer, ours):
        s.set_timesteps(10)
        s.set_begin_index(3)
    t = peer.timesteps[3:4].repeat(4)
    assert torch.allclose(ours.add_noise(data, eps, t), peer.add_noise(data, eps, t), atol=1e-6)
    # Before set_timesteps (training): the exact forward process at those timesteps.
    # (diffusers' DPM schedulers look the level up at the mirrored index there.)
    training = torch.tensor([0, 10, 500, 999])
    fresh = diffusers.DPMSolverMultistepScheduler(**SD_BETAS)
    acp = fresh.alphas_cumprod[training].view(-1, 1, 1, 1)
    assert torch.allclose(
        DPMSolverScheduler.from_config(fresh.config).add_noise(data, eps, training),
        acp.sqrt() * data + (1 - acp).sqrt() * eps,
        atol=1e-6,
    )
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours_flow = DPMSolverScheduler.from_config(flow.config)
    for s in (flow, ours_flow):
        s.set_timesteps(8)
        s.set_begin_index(2)
    t = flow.timesteps[2:3]
    assert torch.allclose(
        ours_flow.scale_noise(data, t, eps), flow.scale_noise(data, t, eps), atol=1e-6
    )


def test_from_config_translates_peer_configs() -> None:
    sd = diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1)
    s = DPMSolverScheduler.from_config(sd.config)
    assert s.config.solver == "dpmpp_multistep" and s.config.prediction_type == "epsilon"
    single = diffusers.DPMSolverSinglestepScheduler(solver_order=3)
    assert DPMSolverScheduler.from_config(single.config).config.solver == "dpmpp_singlestep"
    assert DPMSolverScheduler.from_config(single.config).solver.order == 3
    # An explicit alias that fixes the order wins over the config's solver_order.
    two = DPMSolverScheduler.from_config(single.config, solver="dpmpp_2m")
    assert two.solver.order == 2
    noise_form = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver", final_sigmas_type="sigma_min"
    )
    assert DPMSolverScheduler.from_config(noise_form.config).config.solver == "dpm_multistep"
    sde = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    if "dpmpp_2m_sde" not in dp.REGISTRY and "dpmpp_2m_sde" not in dp.solvers.ALIASES:
        with pytest.raises(ValueError, match=r"pass solver=\.\.\. explicitly"):
            DPMSolverScheduler.from_config(sde.config)
    assert DPMSolverScheduler.from_config(sde.config, solver="dpmpp_2m").config.solver == "dpmpp_2m"
    assert "FlowMatchEulerDiscreteScheduler" in s.compatibles.__repr__() or any(
        c.__name__ == "FlowMatchEulerDiscreteScheduler" for c in s.compatibles
    )
    ddpm = diffusers.DDPMScheduler(variance_type="fixed_small", prediction_type="v_prediction")
    assert DPMSolverScheduler.from_config(ddpm.config).config.prediction_type == "v_prediction"


def test_save_and_load_round_trip(tmp_path: Any) -> None:
    s = DPMSolverScheduler(
        solver="dpmpp_3m",
        solver_options={"third_order": "legacy"},
        use_karras_sigmas=True,
        **SD_BETAS,
    )
    s.save_pretrained(tmp_path)
    loaded = DPMSolverScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(s.config)
    assert loaded.solver == s.solver
    for x in (s, loaded):
        x.set_timesteps(12)
    assert loaded.timesteps.tolist() == s.timesteps.tolist() and torch.equal(
        loaded.sigmas, s.sigmas
    )
    # The saved config also loads into diffusers' scheduler (our extra keys are ignored).
    back = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert back.config.use_karras_sigmas and back.config.beta_schedule == "scaled_linear"


def test_learned_variance_channels_are_dropped() -> None:
    s = DPMSolverScheduler(variance_type="learned_range", **SD_BETAS)
    plain = DPMSolverScheduler(**SD_BETAS)
    x = noise()
    net = exact_network(plain)

    def doubled(x: Tensor, t: Tensor, i: int) -> Tensor:
        out = net(x, t, i)
        return torch.cat([out, torch.full_like(out, 1e3)], dim=1)

    assert torch.equal(denoise(s, doubled, x, 5), denoise(plain, net, x, 5))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"prediction_type": "eps"},
            ValueError,
            r"prediction_type='eps' is not supported; accepted values: 'epsilon'",
        ),
        (
            {"timestep_spacing": "uniform"},
            ValueError,
            r"timestep_spacing='uniform' .*'linspace', 'leading', 'trailing'",
        ),
        (
            {"final_sigmas_type": "denoise_to_zero"},
            ValueError,
            r"final_sigmas_type=.*'zero', 'sigma_min'",
        ),
        (
            {"use_karras_sigmas": True, "use_lu_lambdas": True},
            ValueError,
            "set at most one of use_karras_sigmas",
        ),
        (
            {"use_beta_sigmas": True, "use_karras_sigmas": True},
            ValueError,
            "set at most one of use_karras_sigmas",
        ),
        (
            {"stochastic_sampling": True},
            ValueError,
            r"stochastic_sampling=True .*accepted values: False",
        ),
        ({"solver": "auto", "solver_order": 2}, ValueError, "chooses the solver"),
        ({"grid_convention": "k-diffusion"}, ValueError, r"grid_convention=.*'unipc'"),
        ({"disable_corrector": [-1]}, ValueError, r"disable_corrector\[0\] must be >= 0"),
        ({"thresholding": True, "sample_max_value": 0.0}, ValueError, "sample_max_value"),
        (
            {"solver": "euler_maruyama"},
            ValueError,
            r"solver='euler_maruyama' is not supported; accepted values: .*'dpmpp_2m'",
        ),
        ({"solver": "dpmpp_2m", "solver_order": 3}, ValueError, "has order 2"),
        ({"solver_options": {"variant": "rk4"}}, ValueError, "variant='rk4'"),
        ({"solver_type": "bogus"}, ValueError, r"solver_type='bogus' .*'midpoint', 'heun', 'bh1'"),
        ({"variance_type": "learnt"}, ValueError, r"variance_type='learnt' .*'learned'"),
        ({"singlestep_layout": "auto"}, ValueError, r"singlestep_layout='auto' .*'grid', 'solver'"),
        ({"beta_schedule": "cosine"}, ValueError, r"beta_schedule='cosine' .*'squaredcos_cap_v2'"),
        (
            {"time_shift_type": "log"},
            ValueError,
            r"time_shift_type='log' .*'exponential', 'linear'",
        ),
    ],
)
def test_bad_configuration_names_the_option(
    kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        DPMSolverScheduler(**kwargs)


def test_bad_calls_name_the_problem() -> None:
    s = DPMSolverScheduler(**SD_BETAS)
    with pytest.raises(ValueError, match="call set_timesteps before step"):
        s.step(noise(), 999, noise())
    with pytest.raises(ValueError, match="pass num_inference_steps, timesteps or sigmas"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="num_inference_steps=3 but 2 custom values"):
        s.set_timesteps(3, timesteps=[999, 500])
    with pytest.raises(ValueError, match="strictly monotone"):
        s.set_timesteps(timesteps=[999, 200, 500])
    with pytest.raises(ValueError, match=r"timesteps\[0\]=1500"):
        s.set_timesteps(timesteps=[1500, 500])
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="is not one of the scheduler's timesteps"):
        s.step(noise(), 123, noise())
    flow = DPMSolverScheduler(prediction_type="flow_prediction", use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="needs mu"):
        flow.set_timesteps(4)
    s.set_begin_index(4)
    with pytest.raises(ValueError, match="begin_index=4 is past the last of 4 timesteps"):
        s.step(noise(), s.timesteps[0], noise())


def test_custom_timesteps_match_diffusers() -> None:
    custom = [999, 850, 600, 400, 250, 120, 40]
    peer = diffusers.DPMSolverMultistepScheduler(**SD_BETAS)
    ours = DPMSolverScheduler.from_config(peer.config)
    net = exact_network(ours)
    x = noise()
    theirs = denoise(peer, net, x, timesteps=custom)
    mine = denoise(ours, net, x, timesteps=custom)
    assert ours.timesteps.tolist() == custom
    assert (mine - theirs).abs().max() < 1e-5


def test_continuous_timesteps_match_euler_discrete() -> None:
    """``timestep_type="continuous"`` with v-prediction (EulerDiscreteScheduler's
    EDM-style networks take ``0.25 log(sigma~)``): our Euler (DDIM) on that config is
    diffusers' Euler, network times included. Both start from the same state (diffusers'
    Euler scales its initial noise by sigma_max rather than sqrt(sigma_max^2 + 1) with
    "linspace" spacing, a convention of its own)."""
    peer = diffusers.EulerDiscreteScheduler(
        **SD_BETAS,
        prediction_type="v_prediction",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    ours = DPMSolverScheduler.from_config(peer.config, solver="euler")

    def net(x: Tensor, t: Tensor, i: int) -> Tensor:
        s = math.exp(4 * float(t))
        alpha = 1 / math.sqrt(1 + s * s)
        x0 = MIX.x0(x, alpha, s * alpha).double()
        return from_data(x0, x.double(), alpha, s * alpha, "v").to(x.dtype)

    for s in (peer, ours):
        s.set_timesteps(10)
    assert torch.allclose(ours.timesteps, peer.timesteps, rtol=0, atol=1e-6)
    x = noise()
    theirs = x * math.sqrt(1 + float(peer.sigmas[0]) ** 2)  # x~ = x / alpha
    for i, t in enumerate(peer.timesteps):
        theirs = peer.step(net(peer.scale_model_input(theirs, t), t, i), t, theirs).prev_sample
    assert (denoise(ours, net, x, 10) - theirs).abs().max() < 1e-5
