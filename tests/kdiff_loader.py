"""Load k-diffusion's ``sampling.py`` alone, for the comparison tests.

The package's ``__init__`` imports torchvision, wandb and more (``pip install k-diffusion``
would pull them, and a CUDA build of torch, in), so only the sampling module is loaded: a
stub parent package provides the one helper it uses from ``k_diffusion.utils``. Its own
imports (scipy, torchdiffeq, torchsde, tqdm) must be installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """k-diffusion's ``utils.append_dims``: trailing singleton dimensions up to ``target_dims``."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
    return x[(...,) + (None,) * missing]


def _load(name: str) -> types.ModuleType | None:
    """k-diffusion's module ``name`` under the stub package ``_kd``, or None."""
    full = f"_kd.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"
    if not path.exists():
        return None
    if "_kd" not in sys.modules:
        parent = types.ModuleType("_kd")
        parent.__path__ = []
        utils = types.ModuleType("_kd.utils")
        utils.append_dims = _append_dims  # type: ignore[attr-defined]
        parent.utils = utils  # type: ignore[attr-defined]
        sys.modules["_kd"], sys.modules["_kd.utils"] = parent, utils
    loader_spec = importlib.util.spec_from_file_location(full, path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[full] = module
    try:
        loader_spec.loader.exec_module(module)
    except ImportError:
        del sys.modules[full]
        return None
    setattr(sys.modules["_kd"], name, module)
    return module


def load_kdiffusion_sampling() -> types.ModuleType | None:
    """k-diffusion's ``sampling`` module, or None if k-diffusion or its imports are missing."""
    return _load("sampling")


def load_kdiffusion_external() -> types.ModuleType | None:
    """k-diffusion's ``external`` module (model wrappers), or None."""
    return _load("external") if load_kdiffusion_sampling() is not None else None
