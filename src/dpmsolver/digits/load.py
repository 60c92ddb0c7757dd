"""Loaders for the shipped demo weights (safetensors only, self-describing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .network import DigitsClassifier, DigitsUNet

__all__ = [
    "DIGITS_SCHEDULE",
    "WEIGHTS_DIR",
    "load_classifier",
    "load_default_model",
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

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DENOISER_FILE = "denoiser.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"


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


def load_classifier(device: torch.device | str | None = None) -> DigitsClassifier:
    """Build the demo :class:`DigitsClassifier` (float32, eval mode) from its weights."""
    state, config = _load(WEIGHTS_DIR / CLASSIFIER_FILE, "DigitsClassifier")
    model = DigitsClassifier(**config)
    model.load_state_dict(state, strict=True)
    model.to(device=device)
    return model.eval()
