"""Per-sample reproducible noise.

Every sample gets its own random stream, seeded from its own integer, so a sample's initial
noise and every stochastic-solver increment depend only on its seed: the same sample comes
out whatever the batch size, batch position or number of processes (on the same device
type and dtype). Streams are drawn on the CPU with ``torch.Generator`` (bitwise stable
across runs) and moved to the target device.

The contract of a noise source (:class:`NoiseSource`): stochastic solvers ask for the
standard normal noise of an *interval* of the run, ``noise(x, s, t)`` for the knots ``s``
and ``t``, the normalized Brownian increment over it. A source of fresh draws
(:class:`SeededNoise`) ignores the interval; a Brownian tree (k-diffusion's
``BrownianTreeNoiseSampler``, ``noise_sampler(sigma, sigma_next)``, through
:func:`dpmsolver.frontends.kdiffusion` or :class:`SigmaNoise`) uses it, so that the
increments of nested or repeated intervals are consistent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from .schedules import Knot

__all__ = ["NoiseSource", "SeededNoise", "SigmaNoise", "sample_seeds", "seeded_randn"]


class NoiseSource(Protocol):
    """Standard normal noise shaped like ``x`` for the interval from knot ``s`` to ``t``."""

    def __call__(self, x: Tensor, s: Knot, t: Knot, /) -> Tensor: ...


def _seed_list(seeds: Sequence[int] | Tensor) -> list[int]:
    values = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
    out = []
    for i, s in enumerate(values):
        if isinstance(s, bool) or not isinstance(s, int) or not (0 <= s < 2**63):
            raise ValueError(f"seeds[{i}]={s!r} must be an integer in [0, 2**63)")
        out.append(s)
    if not out:
        raise ValueError("seeds must not be empty")
    return out


def sample_seeds(seed: int, indices: Sequence[int] | Tensor) -> list[int]:
    """Seeds for sample ``indices`` of a run seeded with ``seed``: distinct streams per
    (seed, index), independent of how samples are batched (SplitMix64 mixing)."""
    out = []
    for i in indices.tolist() if isinstance(indices, Tensor) else indices:
        z = (int(seed) * 0x9E3779B97F4A7C15 + int(i) + 1) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        out.append((z ^ (z >> 31)) >> 1)
    return out


def seeded_randn(
    seeds: Sequence[int] | Tensor,
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of shape ``(len(seeds), *shape)``; row i from ``seeds[i]``."""
    rows = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s), dtype=torch.float32)
        for s in _seed_list(seeds)
    ]
    return torch.stack(rows).to(device=device, dtype=dtype)


class SeededNoise:
    """A noise sampler for stochastic solvers: ``noise(x)`` returns standard normal noise
    shaped like ``x``, row i drawn from a generator seeded with ``seeds[i]`` that advances
    with every call. Pass it as ``noise_sampler`` to :func:`dpmsolver.sample`.

    Args:
        seeds: one integer per sample.
    """

    def __init__(self, seeds: Sequence[int] | Tensor) -> None:
        self.seeds = _seed_list(seeds)
        # Offset the stream from the initial-noise stream of the same seed.
        self._gens = [torch.Generator().manual_seed(s ^ 0x5DEECE66D) for s in self.seeds]

    def __call__(self, x: Tensor, s: Knot | None = None, t: Knot | None = None) -> Tensor:
        """Fresh noise like ``x`` (the interval does not matter to fresh draws)."""
        if x.shape[0] != len(self._gens):
            raise ValueError(
                f"noise sampler has {len(self._gens)} seeds but the batch has {x.shape[0]} samples"
            )
        rows = [
            torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float32) for g in self._gens
        ]
        return torch.stack(rows).to(device=x.device, dtype=x.dtype)


class SigmaNoise:
    """A noise source from a k-diffusion-style ``noise_sampler(sigma, sigma_next)`` (as
    k-diffusion's samplers take it, e.g. its ``BrownianTreeNoiseSampler``): the interval's
    ends are passed as k-diffusion sigmas ``sigma / alpha`` (0 for the clean end).

    Args:
        sampler: ``sampler(sigma, sigma_next) -> standard normal noise``.
    """

    def __init__(self, sampler: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.sampler = sampler

    def __call__(self, x: Tensor, s: Knot, t: Knot) -> Tensor:
        def level(k: Knot) -> Tensor:
            return torch.tensor(0.0 if k.lam == float("inf") else k.ksigma, dtype=torch.float64)

        return self.sampler(level(s), level(t))
