"""Merging concurrent network calls into one: the batching barrier of :func:`dpmsolver.tune`.

``tune`` fits every budget in its own Python thread. Each thread's runs call the network
on a few rows at a time (8-35 samples in most stages), where a call costs more per row
than a call on hundreds of rows. :class:`CallMerger` wraps the network: threads join one
of its lanes; a call waits until every thread of its lane is waiting too, then all their
calls run as one (rows concatenated, each row keeping its own network time, as the network
contract of :mod:`dpmsolver.denoiser` allows) and each caller gets its rows back. Every
flush holds exactly one call of each thread of the lane, in the threads' fixed order, so
which rows share a call, and where, is fixed by the threads' own sequences of calls, not
by timing.

A merged row differs from the same row called alone only by the network's batch rounding.
A network that reads one time for the whole batch (``t[0]``) breaks the contract: the
first merged call checks it on one row at the schedule's two ends (:meth:`CallMerger.checked`)
and, if it fails, warns and passes every later call through unmerged.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .denoiser import Network

__all__ = ["CallMerger"]

# a merged row may differ from the row alone by batch rounding (float16 networks ~1e-3);
# a network that reads t[0] for every row is off by its output's change over the schedule
CONTRACT_RTOL = 1e-2


class _Call:
    """One pending call: its arguments, and its result once its flush has run."""

    def __init__(self, x: Tensor, t: Tensor, kwargs: dict[str, Any], order: int) -> None:
        self.x, self.t, self.kwargs, self.order = x, t, kwargs, order
        self.out: Tensor | None = None
        self.error: BaseException | None = None
        self.done = False


class CallMerger:
    """A network whose calls from joined threads run merged, lane by lane (module
    docstring).

    Args:
        model: the network, ``model(x, t, **kwargs) -> output``.
        times: two network times far apart (the schedule's two ends) at which the first
            merged call checks that the network reads each row's own time.
        lanes: the lane of each thread that will join, by its ``order`` (a lane's calls
            wait for every thread of the lane that has not left, joined yet or not).
    """

    def __init__(self, model: Network, times: tuple[float, float], lanes: list[int]) -> None:
        self.model = model
        self.times = times
        self.lanes = lanes
        self.cv = threading.Condition()
        self.remaining = {k: lanes.count(k) for k in set(lanes)}
        self.pending: dict[int, list[_Call]] = {}
        self.local = threading.local()
        self.enabled = True
        self.verified = False
        self.calls = 0  # network calls the flushes made (tests read it)
        self.extra_rows = 0  # rows of the contract check, beyond the callers'

    @contextmanager
    def joined(self, order: int) -> Iterator[None]:
        """While inside, this thread's calls wait for the calls of its lane's other threads;
        in a merged call its rows come in the place of ``order`` among theirs. A thread
        joins once: on leaving it no longer holds its lane's calls back."""
        lane = self.lanes[order]
        self.local.joined = (order, lane)
        try:
            yield
        finally:
            self.local.joined = None
            with self.cv:
                self.remaining[lane] -= 1
                self._flush_if_ready(lane)

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        joined = getattr(self.local, "joined", None)
        if not self.enabled or joined is None:
            return self.model(x, t, **kwargs)
        order, lane = joined
        call = _Call(x, t, kwargs, order)
        with self.cv:
            self.pending.setdefault(lane, []).append(call)
            self._flush_if_ready(lane)
            while not call.done:
                self.cv.wait()
        if call.error is not None:
            raise call.error
        assert call.out is not None
        return call.out

    def _flush_if_ready(self, lane: int) -> None:
        # under self.cv: every thread of the lane is waiting, so no call can join this one
        pending = self.pending.get(lane, [])
        if not pending or len(pending) < self.remaining[lane]:
            return
        batch = sorted(pending, key=lambda c: c.order)
        self.pending[lane] = []
        self.cv.release()  # the other lanes go on meanwhile
        try:
            for group in _groups(batch):
                try:
                    outs = self._run(group)
                except BaseException as e:  # every caller of the group sees the failure
                    for c in group:
                        c.error = e
                else:
                    for c, out in zip(group, outs, strict=True):
                        c.out = out
        finally:
            self.cv.acquire()
        for c in batch:
            c.done = True
        self.cv.notify_all()

    def _run(self, group: list[_Call]) -> list[Tensor]:
        if len(group) == 1 or not self.enabled:
            return [self._one(c) for c in group]
        if not self.verified and not self.checked(group[0]):
            return [self._one(c) for c in group]
        sizes = [c.x.shape[0] for c in group]
        x = torch.cat([c.x for c in group])
        t = torch.cat([c.t for c in group])
        out = self.model(x, t, **_merged_kwargs(group))
        self.calls += 1
        return list(out.split(sizes))

    def _one(self, c: _Call) -> Tensor:
        self.calls += 1
        return self.model(c.x, c.t, **c.kwargs)

    def checked(self, call: _Call) -> bool:
        """Whether the network reads each row's own time: ``call``'s first row twice, at
        the two ends' times in one call, against each alone. Turns merging off with a
        warning if not."""
        self.verified = True
        one = _first_row(call)
        x = torch.cat([call.x[:1], call.x[:1]])
        pair = _merged_kwargs([_Call(call.x[:1], call.t[:1], one, 0)] * 2)
        t = torch.tensor(self.times, dtype=call.t.dtype, device=call.t.device)
        both = self.model(x, t, **pair)
        alone = torch.cat([self.model(x[:1], t[i : i + 1], **one) for i in (0, 1)])
        self.extra_rows += 4
        err = float((both - alone).double().pow(2).mean().sqrt())
        scale = float(alone.double().pow(2).mean().sqrt())
        if not err <= CONTRACT_RTOL * scale:
            self.enabled = False
            warnings.warn(
                "the network does not read each row's own time t (one call at two times "
                f"differs from the two calls alone by {err:.3g}, the output's RMS being "
                f"{scale:.3g}); tune runs its network calls unmerged",
                RuntimeWarning,
                stacklevel=2,
            )
        return self.enabled


def _per_row(v: Any, rows: int) -> bool:
    return isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == rows


def _first_row(call: _Call) -> dict[str, Any]:
    rows = call.x.shape[0]
    return {k: v[:1] if _per_row(v, rows) else v for k, v in call.kwargs.items()}


def _key(c: _Call) -> tuple[Any, ...]:
    """What calls must share to run as one: the state's and time's kind, and every keyword
    argument's (per-row tensors by their row shape; anything else by identity)."""
    rows = c.x.shape[0]
    parts: list[Any] = [tuple(c.x.shape[1:]), c.x.dtype, c.x.device, c.t.dtype]
    for k in sorted(c.kwargs):
        v = c.kwargs[k]
        if _per_row(v, rows):
            parts.append((k, tuple(v.shape[1:]), v.dtype, v.device))
        else:
            parts.append((k, id(v)))
    return tuple(parts)


def _groups(batch: list[_Call]) -> list[list[_Call]]:
    """The flush's calls by :func:`_key`, each group in the calls' order."""
    groups: dict[tuple[Any, ...], list[_Call]] = {}
    for c in batch:
        groups.setdefault(_key(c), []).append(c)
    return list(groups.values())


def _merged_kwargs(group: list[_Call]) -> dict[str, Any]:
    first = group[0]
    rows = first.x.shape[0]
    return {
        k: torch.cat([c.kwargs[k] for c in group]) if _per_row(v, rows) else v
        for k, v in first.kwargs.items()
    }
