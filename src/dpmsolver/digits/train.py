"""Train the built-in digits demo: the classifier and the denoisers.

Usage::

    python -m dpmsolver.digits.train --out src/dpmsolver/digits/weights
    python -m dpmsolver.digits.train --out src/dpmsolver/digits/weights --only denoiser --model flow
    python -m dpmsolver.digits.train --out src/dpmsolver/digits/weights --only denoiser --model edm

``--model`` picks the denoiser(s): ``unet`` (default; the eps-prediction U-Net below),
``flow`` (the rectified-flow :class:`~dpmsolver.digits.network.DigitsDiT`, see
:func:`train_flow`), ``edm`` (the EDM-preconditioned U-Net
:class:`~dpmsolver.digits.network.DigitsEDM`, see :func:`train_edm`) or ``all``.

Data is scikit-learn's bundled ``load_digits()`` (1797 8x8 images, values
0..16), scaled to ``x / 8 - 1`` in ``[-1, 1]``. A deterministic stratified 20%
test split (``random_state=0``) is held out: the classifier is trained on the
train split and its accuracy reported on the test split; the denoiser is also
trained on the *train split only*, so the test split is an unseen "real"
reference set for Frechet distances.

The denoiser uses the Stable-Diffusion "scaled_linear" discrete VP schedule
(:data:`~dpmsolver.digits.load.DIGITS_SCHEDULE`), uniform ``t`` in ``{0..999}``,
eps-prediction MSE, label dropout for classifier-free guidance, and an EMA of
the weights (the EMA weights are saved). The flow and EDM models use the same
data (train split, no augmentation), label dropout, optimizer, learning-rate
schedule, gradient clipping and EMA. Everything is seeded; on a fixed
thread count each run is reproducible. scikit-learn is imported lazily: it is a
training/test dependency only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .load import (
    CLASSIFIER_FILE,
    DENOISER_FILE,
    DIGITS_SCHEDULE,
    EDM_FILE,
    EDM_SCHEDULE,
    FLOW_FILE,
    FLOW_SCHEDULE,
)
from .network import DigitsClassifier, DigitsDiT, DigitsEDM, DigitsUNet

__all__ = [
    "EDM_TRAIN",
    "FLOW_TRAIN",
    "alphas_cumprod",
    "heldout_edm_loss",
    "heldout_flow_mse",
    "load_digits_split",
    "main",
    "train_classifier",
    "train_denoiser",
    "train_edm",
    "train_flow",
]

SPLIT = {"test_size": 0.2, "random_state": 0, "stratify": True}


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)``; x is ``(N,1,8,8)`` float32 in [-1, 1].

    The split is the deterministic stratified 80/20 split recorded in :data:`SPLIT`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(y))),
        test_size=SPLIT["test_size"],
        random_state=SPLIT["random_state"],
        stratify=data.target,
    )
    tr = torch.tensor(idx_train)
    te = torch.tensor(idx_test)
    return x[tr], y[tr], x[te], y[te]


def alphas_cumprod() -> torch.Tensor:
    """``alphas_cumprod`` (float64, length 1000) of the demo's scaled-linear VP schedule."""
    s = DIGITS_SCHEDULE
    betas = (
        torch.linspace(
            s["beta_start"] ** 0.5,
            s["beta_end"] ** 0.5,
            s["num_train_timesteps"],
            dtype=torch.float64,
        )
        ** 2
    )
    return torch.cumprod(1.0 - betas, dim=0)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by an independent integer offset in ``[-max_shift, max_shift]``^2.

    Uncovered pixels are filled with the background value -1.
    """
    b = x.shape[0]
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=-1.0)
    dy = torch.randint(0, 2 * m + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * m + 1, (b,), generator=gen)
    ar = torch.arange(8)
    rows = (dy[:, None] + ar[None, :])[:, :, None]  # (B, 8, 1)
    cols = (dx[:, None] + ar[None, :])[:, None, :]  # (B, 1, 8)
    bi = torch.arange(b)[:, None, None]
    return padded[bi, 0, rows, cols][:, None]


def _cosine_lr(step: int, total: int, warmup: int, base: float, final_frac: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * p)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


@torch.no_grad()
def classifier_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (eval mode is set by the caller)."""
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train_classifier(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    seed: int,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> tuple[DigitsClassifier, float]:
    """Train :class:`DigitsClassifier` with shift/noise augmentation; return it and test acc."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = x_train[idx], y_train[idx]
            # Augment: +-1 pixel shifts (half of the batch), pixel noise, contrast jitter.
            shifted = random_shift(xb, gen)
            keep = torch.rand(xb.shape[0], 1, 1, 1, generator=gen) < 0.5
            xb = torch.where(keep, xb, shifted)
            contrast = 0.8 + 0.4 * torch.rand(xb.shape[0], 1, 1, 1, generator=gen)
            xb = (xb + 1.0) * contrast - 1.0
            sigma = 0.15 * torch.rand(xb.shape[0], 1, 1, 1, generator=gen)
            xb = xb + sigma * torch.randn(xb.shape, generator=gen)
            _set_lr(opt, _cosine_lr(step, total, 50, lr, 0.01))
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            step += 1
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            model.eval()
            acc = classifier_accuracy(model, x_test, y_test)
            print(
                f"[classifier] epoch {epoch + 1:3d}/{epochs} loss {running / steps_per_epoch:.4f} "
                f"test acc {acc:.4f} ({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
    model.eval()
    return model, classifier_accuracy(model, x_test, y_test)


@torch.no_grad()
def heldout_eps_mse(
    model: DigitsUNet,
    x0: torch.Tensor,
    y: torch.Tensor,
    timesteps: Sequence[int],
    seed: int = 0,
) -> dict[int, float]:
    """Conditional eps-prediction MSE on ``x0`` at the given integer timesteps."""
    acp = alphas_cumprod().to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        eps = torch.randn(x0.shape, generator=gen)
        xt = acp[t].sqrt() * x0 + (1 - acp[t]).sqrt() * eps
        pred = model(xt, torch.full((x0.shape[0],), float(t)), y)
        out[t] = (pred - eps).pow(2).mean().item()
    return out


_M = TypeVar("_M", bound=nn.Module)


def _seeded_pair(
    cls: Callable[..., _M], config: Mapping[str, Any], seed: int, name: str
) -> tuple[_M, _M, torch.Generator]:
    """A freshly initialised model (torch's global RNG seeded with ``seed``, which dropout
    then draws from), its EMA copy (eval mode, no gradients) and the batch generator
    (seed + 1)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = cls(**config)
    ema = cls(**config)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    print(f"[{name}] {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    return model, ema, gen


def train_denoiser(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    ema_decay: float,
    p_uncond: float,
    config: dict[str, object],
    log_every: int = 250,
) -> tuple[DigitsUNet, float]:
    """Train :class:`DigitsUNet` (eps-prediction); return the EMA model and final avg loss."""
    model, ema, gen = _seeded_pair(DigitsUNet, config, seed, "denoiser")

    acp = alphas_cumprod().to(torch.float32)
    sqrt_acp, sqrt_1m = acp.sqrt(), (1.0 - acp).sqrt()
    null = int(DIGITS_SCHEDULE["null_label"])
    num_t = int(DIGITS_SCHEDULE["num_train_timesteps"])
    n = x_train.shape[0]

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x0, y = x_train[idx], y_train[idx].clone()
        y[torch.rand(batch_size, generator=gen) < p_uncond] = null
        t = torch.randint(0, num_t, (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = sqrt_acp[t].view(-1, 1, 1, 1) * x0 + sqrt_1m[t].view(-1, 1, 1, 1) * eps
        return F.mse_loss(model(xt, t.to(torch.float32), y), eps)

    last = _fit(
        "denoiser",
        model,
        ema,
        batch_loss,
        steps=steps,
        lr=lr,
        ema_decay=ema_decay,
        log_every=log_every,
    )
    return ema, last


#: Training settings of the shipped flow model (the ``--flow-*`` flags override some).
FLOW_TRAIN: dict[str, Any] = {
    "steps": 8000,
    "batch_size": 128,
    "lr": 1e-3,
    "ema_decay": 0.999,
    "p_uncond": 0.15,
    "config": {
        "dim": 96,
        "depth": 6,
        "heads": 4,
        "mlp_ratio": 4.0,
        "patch_size": 2,
        "image_size": 8,
        "num_classes": 10,
    },
}

#: Training settings of the shipped EDM model (the ``--edm-*`` flags override some).
EDM_TRAIN: dict[str, Any] = {
    "steps": 8000,
    "batch_size": 128,
    "lr": 1e-3,
    "ema_decay": 0.999,
    "p_uncond": 0.15,
    "config": {
        "sigma_data": EDM_SCHEDULE["sigma_data"],
        "sigma_min": EDM_SCHEDULE["sigma_min"],
        "sigma_max": EDM_SCHEDULE["sigma_max"],
        "unet": {
            "channels": 48,
            "channel_mult": [1, 1, 1],
            "num_res_blocks": 1,
            "num_classes": 10,
            "emb_dim": 128,
            "dropout": 0.0,
            "attn_heads": 4,
        },
    },
}


def _fit(
    name: str,
    model: nn.Module,
    ema: nn.Module,
    batch_loss: Callable[[], torch.Tensor],
    *,
    steps: int,
    lr: float,
    ema_decay: float,
    log_every: int,
) -> float:
    """The optimisation loop of every shipped model: AdamW, warmup + cosine learning
    rate, gradient clipping at 1, EMA with warmup. ``batch_loss()`` draws a batch and
    returns its loss. Returns the average loss of the last logging window."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema_params: list[torch.Tensor] = list(ema.parameters())
    params: list[torch.Tensor] = list(model.parameters())
    warmup = min(200, steps // 10 + 1)
    model.train()
    t0 = time.perf_counter()
    running, count, last = 0.0, 0, float("nan")
    for step in range(steps):
        _set_lr(opt, _cosine_lr(step, steps, warmup, lr, 0.02))
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

        decay = min(ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)

        running += loss.item()
        count += 1
        if (step + 1) % log_every == 0 or step == steps - 1:
            elapsed = time.perf_counter() - t0
            last = running / count
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(
                f"[{name}] step {step + 1:6d}/{steps} loss {last:.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {elapsed:.0f}s (eta {eta:.0f}s)",
                flush=True,
            )
            running, count = 0.0, 0
    return last


def train_flow(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    ema_decay: float,
    p_uncond: float,
    config: dict[str, Any],
    log_every: int = 250,
) -> tuple[DigitsDiT, float]:
    """Train :class:`DigitsDiT` by (conditional) flow matching; return the EMA model and loss.

    Rectified flow (Liu et al. 2023): ``x_s = (1 - s) x0 + s eps``, regress the velocity
    ``eps - x0`` with an unweighted MSE, ``s`` drawn from SD3's logit-normal distribution
    (Esser et al. 2024, Sec. 3.1; :data:`~dpmsolver.digits.load.FLOW_SCHEDULE`), network
    time ``1000 s``. Labels are replaced by the null label with probability ``p_uncond``.
    """
    model, ema, gen = _seeded_pair(DigitsDiT, config, seed, "flow")
    null = int(FLOW_SCHEDULE["null_label"])
    m, sd = float(FLOW_SCHEDULE["logit_mean"]), float(FLOW_SCHEDULE["logit_std"])
    scale = float(FLOW_SCHEDULE["model_time_scale"])
    n = x_train.shape[0]

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x0, y = x_train[idx], y_train[idx].clone()
        y[torch.rand(batch_size, generator=gen) < p_uncond] = null
        s = torch.sigmoid(m + sd * torch.randn(batch_size, generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        sb = s.view(-1, 1, 1, 1)
        xs = (1.0 - sb) * x0 + sb * eps
        return F.mse_loss(model(xs, scale * s, y), eps - x0)

    last = _fit(
        "flow",
        model,
        ema,
        batch_loss,
        steps=steps,
        lr=lr,
        ema_decay=ema_decay,
        log_every=log_every,
    )
    return ema, last


def train_edm(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    ema_decay: float,
    p_uncond: float,
    config: dict[str, Any],
    log_every: int = 250,
) -> tuple[DigitsEDM, float]:
    """Train :class:`DigitsEDM` with EDM's loss; return the EMA model and final avg loss.

    Karras et al. 2022, Table 1 / Sec. 5: ``ln sigma ~ N(P_mean, P_std^2)``, ``x = x0 +
    sigma eps``, loss ``lambda(sigma) |D(x; sigma) - x0|^2`` with ``lambda = (sigma^2 +
    sd^2) / (sigma sd)^2`` (so that the raw network's effective target has unit
    weight). Labels are replaced by the null label with probability ``p_uncond``.
    """
    model, ema, gen = _seeded_pair(DigitsEDM, config, seed, "edm")
    null = int(EDM_SCHEDULE["null_label"])
    p_mean, p_std = float(EDM_SCHEDULE["P_mean"]), float(EDM_SCHEDULE["P_std"])
    sd = model.sigma_data
    n = x_train.shape[0]

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x0, y = x_train[idx], y_train[idx].clone()
        y[torch.rand(batch_size, generator=gen) < p_uncond] = null
        sigma = (p_mean + p_std * torch.randn(batch_size, generator=gen)).exp()
        eps = torch.randn(x0.shape, generator=gen)
        weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).view(-1, 1, 1, 1)
        denoised = model(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, y)
        return (weight * (denoised - x0) ** 2).mean()

    last = _fit(
        "edm",
        model,
        ema,
        batch_loss,
        steps=steps,
        lr=lr,
        ema_decay=ema_decay,
        log_every=log_every,
    )
    return ema, last


@torch.no_grad()
def heldout_flow_mse(
    model: DigitsDiT, x0: torch.Tensor, y: torch.Tensor, levels: Sequence[float], seed: int = 0
) -> dict[float, float]:
    """Conditional velocity MSE of a flow model on ``x0`` at noise levels ``s``."""
    gen = torch.Generator().manual_seed(seed)
    scale = float(FLOW_SCHEDULE["model_time_scale"])
    out = {}
    for s in levels:
        eps = torch.randn(x0.shape, generator=gen)
        pred = model((1 - s) * x0 + s * eps, torch.full((x0.shape[0],), scale * s), y)
        out[s] = (pred - (eps - x0)).pow(2).mean().item()
    return out


@torch.no_grad()
def heldout_edm_loss(
    model: DigitsEDM, x0: torch.Tensor, y: torch.Tensor, sigmas: Sequence[float], seed: int = 0
) -> dict[float, float]:
    """Conditional EDM-weighted denoising loss of ``model`` on ``x0`` at the given sigmas."""
    gen = torch.Generator().manual_seed(seed)
    sd = model.sigma_data
    out = {}
    for sigma in sigmas:
        eps = torch.randn(x0.shape, generator=gen)
        d = model(x0 + sigma * eps, torch.full((x0.shape[0],), sigma), y)
        out[sigma] = ((sigma**2 + sd**2) / (sigma * sd) ** 2 * (d - x0).pow(2).mean()).item()
    return out


def _canonical_header(blob: bytes) -> bytes:
    """Re-serialize the safetensors JSON header with sorted keys.

    safetensors writes its metadata map in hash order, which changes from run
    to run; sorting makes identical weights give byte-identical files. The
    header keeps its length (same keys and values), so data offsets are unchanged.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > n:  # different escaping than the writer: keep the original
        return blob
    return blob[:8] + text.ljust(n, b" ") + blob[8 + n :]


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file via a temporary name and ``os.replace``."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_canonical_header(blob))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _train_meta(
    settings: dict[str, Any], steps: int, batch_size: int, lr: float, loss: float
) -> str:
    return json.dumps(
        {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "ema_decay": settings["ema_decay"],
            "p_uncond": settings["p_uncond"],
            "final_loss": round(loss, 5),
        }
    )


class _Kind(NamedTuple):
    """How one model kind is trained, checked and saved."""

    trainer: Callable[..., tuple[nn.Module, float]]
    settings: dict[str, Any]
    heldout: Callable[..., dict[float, float]]
    levels: list[float]  # noise levels of the held-out measure
    measure: str  # its name in the log
    cls: str  # the class recorded in the metadata
    schedule: dict[str, Any]
    file: str


_KINDS: dict[str, _Kind] = {
    "flow": _Kind(
        train_flow,
        FLOW_TRAIN,
        heldout_flow_mse,
        [0.1, 0.3, 0.5, 0.7, 0.9],
        "velocity MSE by s",
        "DigitsDiT",
        FLOW_SCHEDULE,
        FLOW_FILE,
    ),
    "edm": _Kind(
        train_edm,
        EDM_TRAIN,
        heldout_edm_loss,
        [0.01, 0.1, 0.5, 1.0, 5.0],
        "weighted loss by sigma",
        "DigitsEDM",
        EDM_SCHEDULE,
        EDM_FILE,
    ),
}


def _train_and_save(
    kind: str,
    args: argparse.Namespace,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    common: dict[str, str],
) -> None:
    """Train the ``kind`` model (``"flow"`` or ``"edm"``) with its ``--<kind>-*`` flags and
    write its EMA weights with their metadata."""
    spec = _KINDS[kind]
    settings = spec.settings
    steps, batch_size, lr = (getattr(args, f"{kind}_{k}") for k in ("steps", "batch_size", "lr"))
    t0 = time.perf_counter()
    model, loss = spec.trainer(
        x_train,
        y_train,
        seed=args.seed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        ema_decay=settings["ema_decay"],
        p_uncond=settings["p_uncond"],
        config=settings["config"],
    )
    wall = time.perf_counter() - t0
    held = spec.heldout(model, x_test, y_test, spec.levels)
    print(f"[{kind}] done in {wall:.0f}s; final train loss {loss:.4f}")
    print(f"[{kind}] held-out EMA {spec.measure}: " + _fmt(held))
    meta = {
        **common,
        "model": spec.cls,
        "config": json.dumps(model.config),
        "schedule": json.dumps(spec.schedule),
        "weights": "ema",
        "train_data": "train split only",
        "train": _train_meta(settings, steps, batch_size, lr, loss),
    }
    _save_atomic(args.out / spec.file, model.state_dict(), meta)


def _fmt(values: dict[float, float]) -> str:
    return ", ".join(f"{k:g}: {v:.4f}" for k, v in values.items())


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dpmsolver.digits.train",
        description="Train the digits demo classifier and denoiser; write safetensors weights.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for the weights")
    p.add_argument("--only", choices=["both", "classifier", "denoiser"], default="both")
    p.add_argument(
        "--model",
        choices=["unet", "flow", "edm", "all"],
        default="unet",
        help="which denoiser(s) to train: the eps U-Net (default), the rectified-flow DiT, "
        "the EDM U-Net, or all three",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (the shipped weights used 1; results depend on it)",
    )
    p.add_argument("--steps", type=int, default=8000, help="denoiser optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="denoiser batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="denoiser peak learning rate")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.15, help="label dropout probability")
    p.add_argument("--channels", type=int, default=48)
    p.add_argument("--channel-mult", type=int, nargs="+", default=[1, 1, 1])
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--emb-dim", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--attn-heads", type=int, default=4)
    p.add_argument("--clf-epochs", type=int, default=60)
    for kind, train in (("flow", FLOW_TRAIN), ("edm", EDM_TRAIN)):
        p.add_argument(f"--{kind}-steps", type=int, default=train["steps"])
        p.add_argument(f"--{kind}-batch-size", type=int, default=train["batch_size"])
        p.add_argument(f"--{kind}-lr", type=float, default=train["lr"])
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits_split()
    print(f"data: {len(y_train)} train / {len(y_test)} test images", flush=True)
    common = {
        "split": json.dumps(SPLIT),
        "seed": str(args.seed),
        "threads": str(args.threads),
        "torch_version": torch.__version__,
    }
    t_start = time.perf_counter()

    if args.only in ("both", "classifier"):
        t0 = time.perf_counter()
        clf, acc = train_classifier(
            x_train, y_train, x_test, y_test, seed=args.seed, epochs=args.clf_epochs
        )
        print(f"[classifier] test accuracy {acc:.4f} in {time.perf_counter() - t0:.1f}s")
        meta = {
            **common,
            "model": "DigitsClassifier",
            "config": json.dumps(clf.config),
            "test_accuracy": f"{acc:.4f}",
            "input": "(B,1,8,8) float in [-1,1] (sklearn digits x/8-1)",
        }
        _save_atomic(args.out / CLASSIFIER_FILE, clf.state_dict(), meta)

    if args.only in ("both", "denoiser") and args.model in ("unet", "all"):
        config: dict[str, object] = {
            "channels": args.channels,
            "channel_mult": list(args.channel_mult),
            "num_res_blocks": args.num_res_blocks,
            "num_classes": 10,
            "emb_dim": args.emb_dim,
            "dropout": args.dropout,
            "attn_heads": args.attn_heads,
        }
        t0 = time.perf_counter()
        ema, loss = train_denoiser(
            x_train,
            y_train,
            seed=args.seed,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            ema_decay=args.ema_decay,
            p_uncond=args.p_uncond,
            config={**config, "channel_mult": tuple(args.channel_mult)},
        )
        wall = time.perf_counter() - t0
        mse = heldout_eps_mse(ema, x_test, y_test, [50, 250, 500, 750, 950])
        print(f"[denoiser] done in {wall:.0f}s; final train loss {loss:.4f}")
        print(
            "[denoiser] held-out EMA eps-MSE by t: "
            + ", ".join(f"{t}: {v:.4f}" for t, v in mse.items())
        )
        meta = {
            **common,
            "model": "DigitsUNet",
            "config": json.dumps(config),
            "schedule": json.dumps(DIGITS_SCHEDULE),
            "weights": "ema",
            "train_data": "train split only",
            "train": json.dumps(
                {
                    "steps": args.steps,
                    "batch_size": args.batch_size,
                    "lr": args.lr,
                    "ema_decay": args.ema_decay,
                    "p_uncond": args.p_uncond,
                    "final_loss": round(loss, 5),
                }
            ),
        }
        _save_atomic(args.out / DENOISER_FILE, ema.state_dict(), meta)

    if args.only in ("both", "denoiser") and args.model in ("flow", "all"):
        _train_and_save("flow", args, x_train, y_train, x_test, y_test, common)
    if args.only in ("both", "denoiser") and args.model in ("edm", "all"):
        _train_and_save("edm", args, x_train, y_train, x_test, y_test, common)
    print(f"total {time.perf_counter() - t_start:.0f}s; weights in {args.out}")


if __name__ == "__main__":
    main()
