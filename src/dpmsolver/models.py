"""Loading models: the built-in ones, local diffusers model directories and factories.

:func:`load_model` turns a ``--model`` value into a :class:`~dpmsolver.model.LoadedModel`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .analytic import MixtureNetwork, default_mixture
from .frontends.diffusers_grid import (
    prediction_from_diffusers_config,
    schedule_from_diffusers_config,
)
from .model import LoadedModel
from .parameterization import Prediction
from .schedules import DiscreteVPSchedule, NoiseSchedule, RectifiedFlowSchedule, VESchedule

__all__ = [
    "BUILTIN",
    "exact_model",
    "load_builtin",
    "load_builtin_edm",
    "load_builtin_flow",
    "load_diffusers_dir",
    "load_model",
]

#: The names of the models shipped with the package: the digits U-Net (eps prediction,
#: DDPM-trained discrete VP schedule), the rectified-flow transformer (flow prediction)
#: and the EDM-preconditioned U-Net (variance exploding, data prediction).
BUILTIN = ("builtin", "builtin-flow", "builtin-edm")


def _digits(
    network: Callable[..., Tensor],
    schedule: NoiseSchedule,
    prediction: Prediction,
    spec: Mapping[str, Any],
    name: str,
) -> LoadedModel:
    """A shipped digits network (10 classes) with its schedule, as its ``spec`` (the
    schedule dict of :mod:`dpmsolver.digits`) describes its images and null label."""
    size, ch = spec["image_size"], spec["channels"]
    return LoadedModel(
        network,
        schedule,
        prediction,
        (ch, size, size),
        num_classes=10,
        null_label=spec["null_label"],
        name=name,
    )


def load_builtin(device: torch.device) -> LoadedModel:
    """The shipped digits model (8x8, 10 classes, eps prediction, SD schedule)."""
    from .digits import DIGITS_SCHEDULE, load_default_model

    sched = DiscreteVPSchedule(
        beta_schedule=DIGITS_SCHEDULE["beta_schedule"],
        beta_start=DIGITS_SCHEDULE["beta_start"],
        beta_end=DIGITS_SCHEDULE["beta_end"],
        num_train_timesteps=DIGITS_SCHEDULE["num_train_timesteps"],
    )
    net = load_default_model(device=device)
    return _digits(net, sched, DIGITS_SCHEDULE["prediction"], DIGITS_SCHEDULE, "built-in digits")


def load_builtin_flow(device: torch.device) -> LoadedModel:
    """The shipped rectified-flow digits transformer (8x8, 10 classes, flow prediction
    ``eps - x0`` at network time ``1000 sigma``; Lipman et al. 2023, Esser et al. 2024),
    sampled with its measured shift (:data:`~dpmsolver.digits.FLOW_SCHEDULE`)."""
    from .digits import FLOW_SCHEDULE, load_flow_model

    sched = RectifiedFlowSchedule(
        shift=FLOW_SCHEDULE["shift"], model_time_scale=FLOW_SCHEDULE["model_time_scale"]
    )
    net = load_flow_model(device=device)
    return _digits(net, sched, "flow", FLOW_SCHEDULE, "built-in digits (rectified flow)")


def load_builtin_edm(device: torch.device) -> LoadedModel:
    """The shipped EDM digits model (8x8, 10 classes; Karras et al. 2022): a variance
    exploding denoiser ``D(x0 + sigma eps, sigma) ~ x0`` (data prediction, network time
    sigma) on EDM's sigma range (:data:`~dpmsolver.digits.EDM_SCHEDULE`)."""
    from .digits import EDM_SCHEDULE, load_edm_model

    sched = VESchedule(EDM_SCHEDULE["sigma_min"], EDM_SCHEDULE["sigma_max"])
    net = load_edm_model(device=device)
    return _digits(net, sched, "x0", EDM_SCHEDULE, "built-in digits (EDM)")


_BUILTIN_LOADERS = {
    "builtin": load_builtin,
    "builtin-flow": load_builtin_flow,
    "builtin-edm": load_builtin_edm,
}


def load_diffusers_dir(
    path: Path, device: torch.device, *, null_label: int | None = None
) -> LoadedModel:
    """A local diffusers model directory holding ``unet/`` (``UNet2DModel``, optionally
    class-conditional) and ``scheduler/`` with a DDPM-style beta schedule.

    A class-conditional ``UNet2DModel`` (``num_class_embeds = K``) records no label that
    means "no class", so classifier-free guidance needs ``null_label``: the embedding the
    model was trained with for dropped labels. It must be the last one, ``K - 1``; the
    classes are then ``0 .. K-2`` (the layout of the built-in model, DiT and most
    class-conditional training scripts). Other layouts: load the model with a
    ``module:function`` factory that builds the :class:`~dpmsolver.model.LoadedModel`."""
    if not path.is_dir():
        raise ValueError(f"--model {str(path)!r}: no such directory")
    try:
        import diffusers
    except ImportError:
        raise ValueError("--model DIR needs diffusers: pip install diffusers") from None
    unet_dir, cfg_file = path / "unet", path / "scheduler" / "scheduler_config.json"
    if not unet_dir.is_dir() or not cfg_file.is_file():
        raise ValueError(
            f"--model {str(path)!r} must contain unet/ and scheduler/scheduler_config.json"
        )
    cfg = json.loads(cfg_file.read_text())
    from diffusers.utils import is_accelerate_available

    # Without accelerate, diffusers' default (low_cpu_mem_usage=True) prints a six-line
    # warning before falling back to False; ask for what it can do.
    unet = (
        diffusers.UNet2DModel.from_pretrained(
            str(unet_dir), low_cpu_mem_usage=is_accelerate_available()
        )
        .to(device)
        .eval()
    )
    sched = schedule_from_diffusers_config(cfg)
    pred = prediction_from_diffusers_config(cfg)
    num_classes = unet.config.get("num_class_embeds")
    if null_label is not None:
        if num_classes is None:
            raise ValueError(
                f"--null-label: the model in {str(path)!r} is not class-conditional "
                "(its unet has no num_class_embeds)"
            )
        if null_label != num_classes - 1:
            raise ValueError(
                f"--null-label {null_label}: the null label must be the model's last class "
                f"embedding, {num_classes - 1} (classes 0..{num_classes - 2}); for another "
                "layout load the model with --model module:function"
            )
        num_classes -= 1

    def network(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return unet(x, t, class_labels=y).sample

    c, s = int(unet.config.in_channels), int(unet.config.sample_size)
    return LoadedModel(
        network,
        sched,
        pred,
        (c, s, s),
        num_classes=num_classes,
        null_label=null_label,
        name=str(path),
    )


def exact_model(device: torch.device | str = "cpu") -> LoadedModel:
    """The exact Gaussian-mixture "network" in the built-in model's format (1x8x8 samples,
    10 classes with null label 10, Stable Diffusion's discrete schedule, eps prediction):
    a stand-in without weights for tests and benchmarks
    (``--model dpmsolver.models:exact_model``). ``device`` is unused: it computes on the
    input's device."""
    schedule = DiscreteVPSchedule()
    mix = default_mixture(dim=64, num_classes=10, components_per_class=2, seed=0, shape=(1, 8, 8))
    return LoadedModel(
        MixtureNetwork(mix, schedule, "eps"),
        schedule,
        "eps",
        (1, 8, 8),
        num_classes=10,
        null_label=10,
        name="exact mixture (8x8, 10 classes)",
    )


def load_model(spec: str, device: torch.device, *, null_label: int | None = None) -> LoadedModel:
    """A built-in model (:data:`BUILTIN`), a diffusers model directory, or
    ``module:function`` (a factory called with the device, returning a
    :class:`~dpmsolver.model.LoadedModel`). ``null_label``
    applies to a model directory only (:func:`load_diffusers_dir`); the other kinds name
    their own."""
    path = Path(spec)
    is_dir = spec not in BUILTIN and (path.is_dir() or ":" not in spec)
    if null_label is not None and not is_dir:
        raise ValueError(
            f"--null-label applies to a diffusers model directory only; --model {spec!r} "
            "names its own null label"
        )
    if spec in BUILTIN:
        return _BUILTIN_LOADERS[spec](device)
    if is_dir:
        return load_diffusers_dir(path, device, null_label=null_label)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"--model {spec!r}: use {', '.join(BUILTIN)}, a diffusers model directory, or "
            "module:function"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--model {spec!r}: cannot import it ({e})") from None
    model = factory(device)
    if not isinstance(model, LoadedModel):
        raise ValueError(f"--model {spec!r} must return a LoadedModel, got {type(model).__name__}")
    return model
