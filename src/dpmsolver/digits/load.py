"""Loaders for the shipped demo weights (safetensors only, self-describing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .network import DigitsClassifier, DigitsDiT, DigitsEDM, DigitsUNet

__all__ = [
    "DIGITS_SCHEDULE",
    "EDM_SCHEDULE",
    "FLOW_SCHEDULE",
    "WEIGHTS_DIR",
    "load_classifier",
    "load_default_model",
    "load_edm_model",
    "load_flow_model",
    "read_metadata",
]

#: Noise schedule the demo denoiser was trained with (Stable-Diffusion style
#: discrete VP "scaled_linear": ``betas = linspace(sqrt(b0), sqrt(b1), N) ** 2``).
DIGITS_SCHEDULE: dict[str, Any] = {
    "kind": "discrete_vp",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "prediction": "eps",
    "null_label": 10,
    "image_size": 8,
    "channels": 1,
    "pixel_range": [-1, 1],
}

#: How the flow-matching :class:`DigitsDiT` was trained and is meant to be sampled:
#: rectified flow ``x_s = (1 - s) x0 + s eps`` (Liu et al. 2023), the network predicts
#: the velocity ``u = eps - x0`` ("flow" prediction) and receives ``1000 s``, as diffusers'
#: SD3/Flux transformers do (Esser et al. 2024, "SD3", Sec. 2-3). Training times were drawn
#: from SD3's logit-normal distribution ``s = sigmoid(n), n ~ N(logit_mean, logit_std^2)``
#: (SD3, Sec. 3.1). ``shift`` is the recommended *sampling* time shift
#: ``s = shift t / (1 + (shift - 1) t)`` for a time-uniform grid (SD3, Sec. 5.3.2), i.e.
#: ``dpmsolver.RectifiedFlowSchedule(shift=FLOW_SCHEDULE["shift"])``. It is 0.5, not SD3's
#: 3: SD3 shifts *up* for images larger than its 256^2 base (more steps at high noise),
#: and these 8x8 images are far smaller. Measured on this model (100 samples, dpmpp_2m
#: against a 400-step solution, guidance 1 and 3, 5-20 steps), the RMS error at shift 0.5
#: is 1.3-1.7x lower than at shift 1 and 2-4x lower than at shift 3 (at 5 steps and
#: guidance 3, 2% of shift-3 samples were classified as the requested digit, 99% at 0.5);
#: shifts 0.3-0.7 are within about 20% of each other, 0.5 was best at 5 and 10 steps.
FLOW_SCHEDULE: dict[str, Any] = {
    "kind": "rectified_flow",
    "prediction": "flow",
    "interpolant": "x_s = (1 - s) * x0 + s * eps",
    "target": "eps - x0",
    "time_input": "1000 * s",
    "model_time_scale": 1000.0,
    "shift": 0.5,
    "grid": "time_uniform",
    "train_time_distribution": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "null_label": 10,
    "image_size": 8,
    "channels": 1,
    "pixel_range": [-1, 1],
}

#: How the EDM :class:`DigitsEDM` was trained and is meant to be sampled (Karras et al.
#: 2022, "EDM", Table 1 and Sec. 5): variance exploding, ``x = x0 + sigma eps``; the
#: preconditioned model returns the denoised ``x0`` ("x0" prediction) and receives sigma
#: itself as its time, i.e. ``dpmsolver.VESchedule(sigma_min, sigma_max)``. ``sigma_data``
#: is the pixel standard deviation of the training split (0.752, rounded); training
#: sigmas were log-normal ``ln sigma ~ N(P_mean, P_std^2)`` with EDM's loss weight
#: ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``; ``rho`` is EDM's
#: sampling-grid exponent (Eq. 5).
EDM_SCHEDULE: dict[str, Any] = {
    "kind": "ve",
    "preconditioning": "edm",
    "prediction": "x0",
    "time_input": "sigma",
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "sigma_data": 0.75,
    "rho": 7.0,
    "P_mean": -1.2,
    "P_std": 1.2,
    "null_label": 10,
    "image_size": 8,
    "channels": 1,
    "pixel_range": [-1, 1],
}

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DENOISER_FILE = "denoiser.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
FLOW_FILE = "flow.safetensors"
EDM_FILE = "edm.safetensors"


def read_metadata(path: str | Path) -> dict[str, str]:
    """Return the string metadata stored in a safetensors file header."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return dict(meta or {})


def _load(path: Path, expected_model: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"missing demo weights {path}; regenerate with "
            "`python -m dpmsolver.digits.train --out src/dpmsolver/digits/weights`"
        )
    meta = read_metadata(path)
    if meta.get("model") != expected_model:
        raise ValueError(f"{path} holds {meta.get('model')!r}, expected {expected_model!r}")
    config: dict[str, Any] = json.loads(meta["config"])
    return load_file(str(path), device="cpu"), config


def load_default_model(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitsUNet:
    """Build the demo :class:`DigitsUNet` from its shipped weights, in eval mode.

    The architecture is rebuilt from the ``config`` metadata of
    ``weights/denoiser.safetensors``; the weights are the EMA weights. The
    model predicts ``eps`` for the schedule in :data:`DIGITS_SCHEDULE` and takes
    training timesteps ``t`` in ``[0, 999]`` and labels ``y`` (10 = null).

    Args:
        device: target device (default CPU).
        dtype: target floating dtype (default float32).
    """
    state, config = _load(WEIGHTS_DIR / DENOISER_FILE, "DigitsUNet")
    config["channel_mult"] = tuple(config["channel_mult"])
    model = DigitsUNet(**config)
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_flow_model(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitsDiT:
    """Build the shipped flow-matching :class:`DigitsDiT` (EMA weights), in eval mode.

    A rectified-flow velocity predictor (Liu et al. 2023; Esser et al. 2024, "SD3"):
    ``model(x, t, y) -> eps - x0`` for ``x = (1 - s) x0 + s eps``, ``t = 1000 s`` and labels
    ``y`` (10 = null). See :data:`FLOW_SCHEDULE`; sample it with
    ``dpmsolver.RectifiedFlowSchedule(shift=FLOW_SCHEDULE["shift"])``, ``prediction="flow"``.
    The architecture is rebuilt from the ``config`` metadata of ``weights/flow.safetensors``.

    Args:
        device: target device (default CPU).
        dtype: target floating dtype (default float32).
    """
    state, config = _load(WEIGHTS_DIR / FLOW_FILE, "DigitsDiT")
    model = DigitsDiT(**config)
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_edm_model(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitsEDM:
    """Build the shipped EDM-preconditioned :class:`DigitsEDM` (EMA weights), in eval mode.

    A variance-exploding denoiser (Karras et al. 2022, "EDM", Table 1 / Sec. 5):
    ``model(x, sigma, y) -> D(x; sigma)``, the denoised ``x0`` for ``x = x0 + sigma eps``,
    labels ``y`` (10 = null). See :data:`EDM_SCHEDULE`; sample it with
    ``dpmsolver.VESchedule(0.002, 80.0)`` and ``prediction="x0"``.
    The architecture is rebuilt from the ``config`` metadata of ``weights/edm.safetensors``.

    Args:
        device: target device (default CPU).
        dtype: target floating dtype (default float32; the preconditioning coefficients
            are always computed in at least float32).
    """
    state, config = _load(WEIGHTS_DIR / EDM_FILE, "DigitsEDM")
    model = DigitsEDM(**config)
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_classifier(device: torch.device | str | None = None) -> DigitsClassifier:
    """Build the demo :class:`DigitsClassifier` (float32, eval mode) from its weights."""
    state, config = _load(WEIGHTS_DIR / CLASSIFIER_FILE, "DigitsClassifier")
    model = DigitsClassifier(**config)
    model.load_state_dict(state, strict=True)
    model.to(device=device)
    return model.eval()
