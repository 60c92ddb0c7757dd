"""Every registered solver (names, aliases and the ``"auto"`` policy) from every config a
diffusers pipeline may hand the scheduler: no failure, a finite result, one ``step`` per
timestep and every planned evaluation consumed.

The network is a cheap stand-in (its output only has to be finite); agreement with
diffusers is tests/test_frontends_diffusers.py's job. One scheduler is built per
(config, solver) and sampled at each step count, so the matrix stays around a minute on
one core.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dpmsolver as dp
from dpmsolver.recipe import POLICIES

diffusers = pytest.importorskip("diffusers")
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from dpmsolver.frontends.diffusers_scheduler import (  # noqa: E402
    _COMPATIBLES,
    DPMSolverScheduler,
)

diffusers_logging.set_verbosity_error()
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
    pytest.mark.filterwarnings("ignore::FutureWarning:diffusers"),
    # diffusers warns when it changes a config for its own scheduler, and some of its
    # schedulers' constructors hand tensors to numpy; not ours to judge.
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning"),
]

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

# Each compatible scheduler at its defaults, and the configs pipelines actually ship.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {c: (c, {}) for c in _COMPATIBLES}
CONFIGS.update(
    {
        "sd15-pndm": (
            "PNDMScheduler",
            {**SD, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False},
        ),
        "sdxl-euler": (
            "EulerDiscreteScheduler",
            {**SD, "timestep_spacing": "leading", "steps_offset": 1},
        ),
        "v-prediction": ("DDIMScheduler", {**SD, "prediction_type": "v_prediction"}),
        "zero-snr": (
            "DDIMScheduler",
            {
                **SD,
                "prediction_type": "v_prediction",
                "rescale_betas_zero_snr": True,
                "timestep_spacing": "trailing",
            },
        ),
        "karras": ("DPMSolverMultistepScheduler", {**SD, "use_karras_sigmas": True}),
        "lu-sigma-min": (
            "DPMSolverMultistepScheduler",
            {**SD, "use_lu_lambdas": True, "final_sigmas_type": "sigma_min"},
        ),
        "beta-sigmas": ("EulerDiscreteScheduler", {**SD, "use_beta_sigmas": True}),
        "continuous-v": (
            "EulerDiscreteScheduler",
            {
                **SD,
                "prediction_type": "v_prediction",
                "timestep_type": "continuous",
                "use_karras_sigmas": True,
            },
        ),
        "threshold-below-1": (
            "DPMSolverMultistepScheduler",
            {"thresholding": True, "sample_max_value": 0.8},
        ),
        "dpm-sde": ("DPMSolverMultistepScheduler", {**SD, "algorithm_type": "sde-dpmsolver++"}),
        "dpm-3s": ("DPMSolverSinglestepScheduler", {**SD, "solver_order": 3}),
        "dpm-flow": (
            "DPMSolverMultistepScheduler",
            {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
        ),
        "unipc-bh1-eps": (
            "UniPCMultistepScheduler",
            {**SD, "solver_type": "bh1", "predict_x0": False, "disable_corrector": [0]},
        ),
        "unipc-wan": (
            "UniPCMultistepScheduler",
            {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 5.0},
        ),
        "deis-3": ("DEISMultistepScheduler", {**SD, "solver_order": 3}),
        "ddpm-learned": ("DDPMScheduler", {"variance_type": "learned_range"}),
        "sd3-shift3": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
        "flux-dynamic": ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}),
    }
)
SOLVERS = [*POLICIES, *dp.REGISTRY, *dp.solvers.ALIASES]
STEPS = (1, 3, 10, 25)


def sample(scheduler: DPMSolverScheduler, steps: int) -> tuple[torch.Tensor, int]:
    """A pipeline's loop with a stand-in network (mu is what Flux passes; others ignore it)."""
    scheduler.set_timesteps(steps, mu=0.8)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    calls = 0
    for t in scheduler.timesteps:
        out = 0.3 * x + 0.1
        if scheduler.config.variance_type in ("learned", "learned_range"):
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
        calls += 1
    return x, calls


@pytest.mark.parametrize("label", list(CONFIGS))
def test_every_solver_runs_from_every_compatible_config(label: str) -> None:
    cls, kwargs = CONFIGS[label]
    config = getattr(diffusers, cls)(**kwargs).config
    failures = []
    for name in SOLVERS:
        try:
            scheduler = DPMSolverScheduler.from_config(config, solver=name)
        except Exception as exc:  # collect, so one run reports every failing cell
            failures.append(f"{name}: from_config: {type(exc).__name__}: {exc}")
            continue
        for steps in STEPS:
            try:
                x, calls = sample(scheduler, steps)
                assert calls == len(scheduler.timesteps) == scheduler.step_index
                assert scheduler._stepper is not None and scheduler._stepper.done
                assert torch.isfinite(x).all(), "non-finite result"
            except Exception as exc:
                failures.append(f"{name} x {steps}: {type(exc).__name__}: {exc}")
    assert not failures, f"{len(failures)} of {len(SOLVERS) * len(STEPS)} failed:\n" + "\n".join(
        failures
    )
