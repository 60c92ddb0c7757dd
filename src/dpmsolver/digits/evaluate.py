"""Sample quality of the shipped digits denoisers: class accuracy and a Frechet distance.

Usage::

    python -m dpmsolver.digits.evaluate [--models unet flow edm] [--guidance 1 3] [--nfe 50]

Each model draws ``per_class`` conditional samples per class from the same seeded noise
with ``dpmsolver.sample`` (``dpmpp_2m`` by default, each model on its natural grid: the
U-Net on the log-SNR grid, the flow model on SD3's shifted time-uniform grid, the EDM
model on EDM's ``rho = 7`` grid). The shipped classifier scores them: *class accuracy*
is the fraction assigned to the requested class, and the *Frechet distance* compares
Gaussians fitted to its penultimate features of the samples and of the 360 held-out real
digits (:mod:`dpmsolver.bench.quality`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .load import (
    DIGITS_SCHEDULE,
    EDM_SCHEDULE,
    FLOW_SCHEDULE,
    load_classifier,
    load_default_model,
    load_edm_model,
    load_flow_model,
)

if TYPE_CHECKING:
    from ..parameterization import Prediction
    from ..schedules import NoiseSchedule
    from ..timegrid import GridKind

__all__ = ["MODELS", "SamplingSetup", "sample_digits", "sampling_setup", "score"]

MODELS = ("unet", "flow", "edm")


@dataclass(frozen=True)
class SamplingSetup:
    """What ``dpmsolver.sample`` needs to sample one shipped model."""

    network: Callable[..., torch.Tensor]
    schedule: NoiseSchedule
    prediction: Prediction
    grid: GridKind
    null_label: int


def sampling_setup(kind: str, *, shift: float | None = None) -> SamplingSetup:
    """The network, schedule, prediction and grid of shipped model ``kind`` (one of
    :data:`MODELS`); ``shift`` overrides the flow model's recorded sampling shift."""
    import dpmsolver

    if kind == "unet":
        s = DIGITS_SCHEDULE
        sched = dpmsolver.DiscreteVPSchedule(
            beta_schedule=s["beta_schedule"],
            beta_start=s["beta_start"],
            beta_end=s["beta_end"],
            num_train_timesteps=s["num_train_timesteps"],
        )
        return SamplingSetup(load_default_model(), sched, "eps", "logsnr", s["null_label"])
    if kind == "flow":
        s = FLOW_SCHEDULE
        flow = dpmsolver.RectifiedFlowSchedule(
            shift=s["shift"] if shift is None else shift, model_time_scale=s["model_time_scale"]
        )
        return SamplingSetup(load_flow_model(), flow, "flow", s["grid"], s["null_label"])
    if kind == "edm":
        s = EDM_SCHEDULE
        ve = dpmsolver.VESchedule(s["sigma_min"], s["sigma_max"])
        return SamplingSetup(load_edm_model(), ve, "x0", "karras", s["null_label"])
    raise ValueError(f"unknown model {kind!r}; expected one of {MODELS}")


@torch.no_grad()
def sample_digits(
    setup: SamplingSetup,
    labels: torch.Tensor,
    *,
    guidance: float,
    nfe: int,
    solver: str = "dpmpp_2m",
    seed: int = 0,
) -> torch.Tensor:
    """Conditional samples ``(len(labels), 1, 8, 8)`` from seeded standard-normal noise."""
    import dpmsolver

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), 1, 8, 8, generator=gen)
    uncond = {"y": torch.full_like(labels, setup.null_label)} if guidance != 1.0 else None
    res = dpmsolver.sample(
        setup.network,
        noise,
        schedule=setup.schedule,
        prediction=setup.prediction,
        solver=solver,
        nfe=nfe,
        grid=setup.grid,
        cond={"y": labels},
        uncond=uncond,
        guidance_scale=guidance,
    )
    return res.x


def score(x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """``(class accuracy, Frechet distance of classifier features to the held-out digits)``."""
    from ..bench.quality import classify, frechet_distance, real_digits

    clf = load_classifier()
    pred, feats = classify(clf, x)
    _, real_feats = classify(clf, real_digits()[0])
    return float((pred == labels.numpy()).mean()), frechet_distance(feats, real_feats)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: print a Markdown table of accuracy and Frechet distance."""
    p = argparse.ArgumentParser(prog="python -m dpmsolver.digits.evaluate", description=__doc__)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--guidance", nargs="+", type=float, default=[1.0, 3.0])
    p.add_argument("--nfe", type=int, default=50)
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=None, help="flow sampling shift override")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    print("| model | solver | NFE | guidance | class accuracy | Frechet distance | seconds |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.models:
        setup = sampling_setup(kind, shift=args.shift)
        for w in args.guidance:
            t0 = time.perf_counter()
            x = sample_digits(
                setup, labels, guidance=w, nfe=args.nfe, solver=args.solver, seed=args.seed
            )
            acc, fd = score(x, labels)
            print(
                f"| {kind} | {args.solver} | {args.nfe} | {w:g} | {acc:.3f} | {fd:.3f} "
                f"| {time.perf_counter() - t0:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
