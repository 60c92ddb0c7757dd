"""Test helpers for the reference implementations (diffusers, k-diffusion).

Peers are imported in tests only, never in ``src``. k-diffusion's package ``__init__``
imports torchvision and more that the test environment lacks, so :func:`kdiffusion_sampling`
loads only its ``sampling.py``, under a stand-in parent package whose ``utils`` provides the
one helper that module uses (``append_dims``).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import dpmsolver as dp

__all__ = ["KDenoiser", "diffusers_schedule", "kdiffusion_sampling"]

_PARENT = "_kd"


def _append_dims(x: Tensor, target_dims: int) -> Tensor:
    """k-diffusion's ``utils.append_dims``: trailing singleton dimensions up to ``target_dims``."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def kdiffusion_sampling() -> types.ModuleType:
    """k-diffusion's ``sampling`` module, loaded without the package ``__init__``.

    Skips the calling test if k-diffusion (or a dependency of ``sampling.py``: scipy,
    torchdiffeq, torchsde, tqdm) is not installed.
    """
    name = f"{_PARENT}.sampling"
    if name in sys.modules:
        return sys.modules[name]
    import pytest

    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        pytest.skip("k-diffusion is not installed")
    path = Path(spec.origin).parent / "sampling.py"
    parent = types.ModuleType(_PARENT)
    parent.__path__ = []
    utils = types.ModuleType(f"{_PARENT}.utils")
    utils.append_dims = _append_dims  # type: ignore[attr-defined]
    sys.modules.setdefault(_PARENT, parent)
    sys.modules.setdefault(f"{_PARENT}.utils", utils)
    parent.utils = sys.modules[f"{_PARENT}.utils"]  # type: ignore[attr-defined]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except ImportError as exc:
        pytest.skip(f"k-diffusion's sampling module needs {exc.name}")
    sys.modules[name] = module
    return module


class KDenoiser:
    """A k-diffusion model ``model(x~, sigma~) -> D`` from an exact denoiser ``D(x, knot)``:
    ``x = alpha x~`` at the knot whose k-diffusion sigma is ``sigma~`` (Karras et al. 2022,
    Eq. 7 preconditioning in reverse). Counts calls."""

    def __init__(
        self, denoiser: Callable[[Tensor, dp.Knot], Tensor], schedule: dp.NoiseSchedule
    ) -> None:
        self.denoiser = denoiser
        self.schedule = schedule
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        ksig = float(sigma.reshape(-1)[0])
        knot = self.schedule.knot_at_lambda(-math.log(ksig))
        return self.denoiser(x * knot.alpha, knot)


def diffusers_schedule(scheduler: object) -> dp.DiscreteVPSchedule:
    """Our schedule on exactly a diffusers scheduler's (float32-computed) ``alphas_cumprod``."""
    acp = scheduler.alphas_cumprod  # type: ignore[attr-defined]
    return dp.DiscreteVPSchedule(alphas_cumprod=torch.as_tensor(acp).to(torch.float64))
