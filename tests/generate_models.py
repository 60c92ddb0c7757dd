"""Models for the generation tests, importable by the subprocesses those tests start
(``--model tests.generate_models:slow_exact_model``)."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from dpmsolver.analytic import MixtureNetwork
from dpmsolver.model import LoadedModel
from dpmsolver.models import exact_model


class SlowExact(MixtureNetwork):
    """The exact network, 40 ms per call, so that a test can kill a run part-way."""

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        time.sleep(0.04)
        return super().__call__(x, t, y)


class CallSizeSensitive(MixtureNetwork):
    """The exact network plus a last-bits term that depends on how many rows the call has,
    as real networks' kernels do (the built-in U-Net on CPU below and above 16 rows)."""

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return super().__call__(x, t, y) * (1 + 1e-6 * x.shape[0])


class NaNForClass(MixtureNetwork):
    """The exact network, except that rows of class 7 turn NaN below t = 500."""

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out = super().__call__(x, t, y)
        if y is not None and float(t[0]) < 500:
            out = torch.where((y == 7).view(-1, *[1] * (x.ndim - 1)), torch.nan, out)
        return out


def _like_exact(cls: type[MixtureNetwork]) -> LoadedModel:
    base = exact_model()
    net = base.network
    assert isinstance(net, MixtureNetwork)
    return LoadedModel(
        cls(net.mixture, net.schedule, net.prediction),
        base.schedule,
        base.prediction,
        base.shape,
        num_classes=base.num_classes,
        null_label=base.null_label,
        name=cls.__name__,
    )


def slow_exact_model(device: torch.device) -> LoadedModel:
    """:class:`SlowExact` in the format of :func:`dpmsolver.generate.exact_model`."""
    return _like_exact(SlowExact)


def call_size_sensitive_model(device: torch.device | None = None) -> LoadedModel:
    """:class:`CallSizeSensitive` in the format of :func:`dpmsolver.generate.exact_model`."""
    return _like_exact(CallSizeSensitive)


def nan_model(device: torch.device | None = None) -> LoadedModel:
    """:class:`NaNForClass` in the format of :func:`dpmsolver.generate.exact_model`."""
    return _like_exact(NaNForClass)


#: How often :func:`counting_model` was loaded and its network called, in this process.
COUNTS = {"loads": 0, "calls": 0}


class Counting(MixtureNetwork):
    """The exact network, counting its calls in :data:`COUNTS`."""

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        COUNTS["calls"] += 1
        return super().__call__(x, t, y)


def counting_model(device: torch.device | None = None) -> LoadedModel:
    """:class:`Counting` in the format of :func:`dpmsolver.generate.exact_model`; counts
    its loads in :data:`COUNTS` too, so a test can tell that no work began."""
    COUNTS["loads"] += 1
    return _like_exact(Counting)
