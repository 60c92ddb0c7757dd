"""Peer implementations for side-by-side benchmarks (never imported by the core).

diffusers and k-diffusion are benchmark extras. k-diffusion's package ``__init__`` imports
heavy optional packages (torchvision, scikit-image, ...); its ``sampling`` module needs only
torch, scipy, torchsde, torchdiffeq and trampoline, so it is loaded on its own under a
private package name with a one-function stand-in for ``k_diffusion.utils``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["diffusers_class", "load_kdiffusion_sampling", "optional_import", "run_scheduler"]


def optional_import(name: str) -> Any:
    """The module, or None if it (or one of its dependencies) is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def diffusers_class(name: str) -> Any:
    """The diffusers class ``name`` (a scheduler), or None where diffusers is not
    installed or its release lacks that class."""
    diffusers = optional_import("diffusers")
    if diffusers is None or not hasattr(diffusers, name):
        return None
    return getattr(diffusers, name)


def run_scheduler(sched: Any, eps: Callable[[Tensor, Any], Tensor], sample: Tensor) -> Tensor:
    """diffusers' denoising loop: a scheduler whose ``set_timesteps`` was called, stepped
    over its timesteps from ``sample`` with the noise prediction ``eps(model_input, t)``
    (one network call per timestep); the final sample."""
    for t in sched.timesteps:
        model_in = sched.scale_model_input(sample, t)
        sample = sched.step(eps(model_in, t), t, sample).prev_sample
    return sample


def _append_dims(x: Tensor, target_dims: int) -> Tensor:
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load_kdiffusion_sampling() -> Any:
    """k-diffusion's ``sampling`` module without its package ``__init__``, or None."""
    name = "_dpmsolver_kdiffusion"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    for dep in ("scipy", "torchsde", "torchdiffeq", "trampoline"):
        if importlib.util.find_spec(dep) is None:
            return None
    pkg = types.ModuleType(name)
    pkg.__path__ = []
    utils = types.ModuleType(f"{name}.utils")
    utils.append_dims = _append_dims  # type: ignore[attr-defined]
    sys.modules[name] = pkg
    sys.modules[f"{name}.utils"] = utils
    path = f"{next(iter(spec.submodule_search_locations))}/sampling.py"
    sspec = importlib.util.spec_from_file_location(f"{name}.sampling", path)
    assert sspec is not None and sspec.loader is not None
    module = importlib.util.module_from_spec(sspec)
    sys.modules[f"{name}.sampling"] = module
    sspec.loader.exec_module(module)
    return module
