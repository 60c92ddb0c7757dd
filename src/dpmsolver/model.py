"""A trained network with what sampling it needs, and batch-independent sampling of it.

:class:`LoadedModel` bundles a network with its schedule, prediction, sample shape and
classes; :mod:`dpmsolver.models` loads the built-in ones and local model directories into
it, and :func:`dpmsolver.generate.generate` and the command line sample it.
:func:`sample_indices` samples given sample indices of a run so that sample ``i`` depends
only on ``(seed, i)``: its initial noise and its stochastic-solver noise come from streams
seeded by the pair (:mod:`dpmsolver.noise`), never from its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .loop import SampleResult
from .noise import SeededNoise, sample_seeds, seeded_randn
from .parameterization import Prediction
from .recipe import Recipe, RecipeSource
from .sampling import SampleOptions, sample
from .schedules import NoiseSchedule

__all__ = ["LoadedModel", "evaluations", "resolve_device", "sample_batches", "sample_indices"]


class LoadedModel:
    """A network with what sampling needs: schedule, prediction, conditioning, shape.

    Args:
        network: ``network(x, t, y=None) -> output`` (``y``: class labels, if conditional).
        schedule: its noise schedule.
        prediction: what it outputs (``"eps"``, ``"x0"``, ``"v"``, ``"flow"``, ...).
        shape: the shape of one sample, e.g. ``(1, 8, 8)``.
        num_classes: number of classes of a class-conditional network, else None.
        null_label: the label that means "no class" (classifier-free guidance), or None.
        value_range: the data's value range (for images).
        name: for messages.
    """

    def __init__(
        self,
        network: Callable[..., Tensor],
        schedule: NoiseSchedule,
        prediction: Prediction,
        shape: tuple[int, ...],
        *,
        num_classes: int | None,
        null_label: int | None,
        value_range: tuple[float, float] = (-1.0, 1.0),
        name: str = "model",
    ) -> None:
        self.network = network
        self.schedule = schedule
        self.prediction: Prediction = prediction
        self.shape = shape
        self.num_classes = num_classes
        self.null_label = null_label
        self.value_range = value_range
        self.name = name

    def conditioning(self, labels: Tensor | None, guidance: float) -> dict[str, Any]:
        """:func:`dpmsolver.sample` keyword arguments for these labels and guidance scale."""
        if labels is None or self.num_classes is None:
            if guidance != 1.0:
                raise ValueError(f"guidance={guidance:g} needs a class-conditional model")
            return {}
        cond = {"y": labels}
        if guidance == 1.0:
            return {"cond": cond}
        if self.null_label is None:
            raise ValueError(f"guidance={guidance:g} needs a model trained with a null label")
        null = torch.full_like(labels, self.null_label)
        return {"cond": cond, "uncond": {"y": null}, "guidance_scale": guidance}


def resolve_device(spec: str, name: str = "device") -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when present) as a device;
    a ValueError naming the parameter ``name`` for anything else or for CUDA without a GPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(
            f"{name} {spec!r} is not a device (use cpu, cuda, cuda:N or auto)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {spec!r} requested but CUDA is not available")
    return dev


def sample_indices(
    model: LoadedModel,
    indices: Sequence[int],
    labels: Tensor | None,
    *,
    solver: str | Recipe,
    nfe: int | None,
    guidance: float,
    seed: int,
    device: torch.device,
    grid: str | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    network: Callable[..., Tensor] | None = None,
    steps: int | None = None,
    profile: RecipeSource | None = None,
) -> SampleResult:
    """Sample the run's samples ``indices`` (with class ``labels``, one per index) as one
    batch. Sample i's initial noise and its stochastic-solver noise (a separate stream)
    come only from ``(seed, i)``, so a sample does not depend on which batch it is in.

    Args:
        nfe, steps: the budget in network evaluations, or in grid steps (at most one;
            neither for an adaptive solver), as :func:`dpmsolver.sample` takes them.
        dtype: dtype of the initial noise and state (float16/bfloat16 run the network in
            that dtype, see :func:`dpmsolver.sample`).
        network: call this instead of ``model.network`` (e.g. a wrapper that fixes how the
            rows are grouped into network calls).
        profile: a tuned profile for ``solver="auto"`` (:func:`dpmsolver.tune`).
    """
    seeds = sample_seeds(seed, indices)
    noise = seeded_randn(seeds, model.shape, device=device, dtype=dtype)
    y = labels.to(device) if labels is not None else None
    kwargs = model.conditioning(y, guidance)
    with torch.no_grad():
        return sample(
            network if network is not None else model.network,
            noise,
            schedule=model.schedule,
            prediction=model.prediction,
            solver=solver,
            nfe=nfe,
            steps=steps,
            grid=grid,  # type: ignore[arg-type]
            progress=progress,
            profile=profile,
            options=SampleOptions(noise_sampler=SeededNoise(seeds)),
            **kwargs,
        )


def sample_batches(
    model: LoadedModel,
    labels: Tensor | None,
    n: int,
    *,
    solver: str | Recipe,
    nfe: int | None,
    guidance: float,
    seed: int,
    batch: int,
    device: torch.device,
    grid: str | None = None,
    progress: bool = False,
    steps: int | None = None,
    profile: RecipeSource | None = None,
) -> tuple[Tensor, int]:
    """Samples ``0 .. n-1`` in batches of ``batch`` (:func:`sample_indices`, so the result
    does not depend on the batch size). Returns (samples on CPU, evaluations spent)."""
    out, spent = [], 0
    for start in range(0, n, batch):
        idx = list(range(start, min(n, start + batch)))
        r = sample_indices(
            model,
            idx,
            labels[idx] if labels is not None else None,
            solver=solver,
            nfe=nfe,
            steps=steps,
            guidance=guidance,
            seed=seed,
            device=device,
            grid=grid,
            progress=progress,
            profile=profile,
        )
        out.append(r.x.float().cpu())
        spent += r.nfe
    return torch.cat(out), spent


def evaluations(
    model: LoadedModel,
    solver: str | Recipe,
    *,
    nfe: int | None = None,
    steps: int | None = None,
    grid: str | None = None,
) -> int:
    """The network evaluations one sample costs with this solver and budget, found by a
    one-row run through a zero network (grid arithmetic only, nothing of the model runs).
    Raises what :func:`dpmsolver.sample` raises, e.g. a ValueError naming ``nfe`` for a
    budget a singlestep solver cannot spend. Not meaningful for adaptive solvers, whose
    cost depends on the network."""
    with torch.no_grad():
        return sample(
            lambda x, t, **kw: torch.zeros_like(x),
            torch.zeros(1, *model.shape),
            schedule=model.schedule,
            prediction=model.prediction,
            solver=solver,
            nfe=nfe,
            steps=steps,
            grid=grid,  # type: ignore[arg-type]
        ).nfe
