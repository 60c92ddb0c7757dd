"""Merged network calls (dpmsolver.merge.CallMerger): threads' calls run as one, each caller
gets its own rows back, a network that ignores per-row times is caught, and tune chooses
the same with its budgets' calls merged."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import dpmsolver as dp
from dpmsolver.merge import CallMerger

from .test_tune import FAST  # tune's cheap options, its later stages off

TIMES = (999.0, 0.0)


class Net:
    """A network that records the rows of every call; its output depends on each row's
    time, or, with ``first_time``, on the first row's for every row (breaking the
    contract)."""

    def __init__(self, first_time: bool = False, fail_on: int | None = None) -> None:
        self.first_time, self.fail_on = first_time, fail_on
        self.rows: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with self.lock:
            self.rows.append(x.shape[0])
        if self.fail_on is not None and bool((y == self.fail_on).any()):
            raise RuntimeError("network failed")
        tt = t[:1].expand_as(t) if self.first_time else t
        return torch.sin(x) * (1 + tt[:, None] / 1000) + y[:, None]


def run_threads(net: Callable[..., Tensor], merger: CallMerger | None, n: int) -> list:
    """``n`` threads, each making 3 calls of its own rows (thread i: i + 1 rows, labels i)
    at its own times; the results (or errors) in thread order."""
    out: list = [None] * n

    def work(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        calls = []
        try:
            with merger.joined(i) if merger is not None else contextlib.nullcontext():
                for k in range(3):
                    x = torch.randn(i + 1, 4, generator=g)
                    t = torch.full((i + 1,), 100.0 * (i + k))
                    calls.append((x, t, net(x, t, y=torch.full((i + 1,), i))))
            out[i] = calls
        except RuntimeError as e:
            out[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def test_joined_threads_calls_run_as_one_and_each_gets_its_rows() -> None:
    net = Net()
    merger = CallMerger(net, TIMES, [0] * 4)
    out = run_threads(merger, merger, 4)
    for i, calls in enumerate(out):
        for x, t, got in calls:
            assert torch.allclose(got, net(x, t, y=torch.full((i + 1,), i)), atol=1e-6)
    # after the contract check (2 + 1 + 1 rows): one call of all 4 threads' 10 rows per step
    assert merger.extra_rows == 4
    assert net.rows[:3] == [2, 1, 1]
    assert net.rows[3:6] == [10, 10, 10]
    assert merger.calls == 3


def test_which_rows_share_a_call_does_not_depend_on_when_threads_start() -> None:
    """Each flush waits for every thread of the lane that has not left, started or not, so
    a thread that starts late still shares the first call."""
    seen = []
    for delays in ([0.0, 0.0, 0.0], [0.05, 0.0, 0.02]):
        net = Net()
        merger = CallMerger(net, TIMES, [0] * 3)
        slow = _Delayed(merger, delays)
        run_threads(slow, merger, 3)
        seen.append(net.rows)
    assert seen[0] == seen[1] == [2, 1, 1, 6, 6, 6]


class _Delayed:
    """Calls ``merger`` after each thread's delay, before its first call only."""

    def __init__(self, merger: CallMerger, delays: list[float]) -> None:
        self.merger, self.delays = merger, delays
        self.started: set[int] = set()

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        i = int(y[0])
        if i not in self.started:
            self.started.add(i)
            time.sleep(self.delays[i])
        return self.merger(x, t, y=y)


def test_a_thread_alone_or_not_joined_calls_the_network_directly() -> None:
    net = Net()
    merger = CallMerger(net, TIMES, [0])
    x, t, y = torch.randn(3, 4), torch.full((3,), 5.0), torch.zeros(3)
    assert torch.equal(merger(x, t, y=y), net(x, t, y=y))
    run_threads(merger, merger, 1)
    assert merger.extra_rows == 0  # one call a flush never merges, so nothing to check


def test_a_network_that_reads_one_time_for_the_batch_is_caught_and_runs_unmerged() -> None:
    net = Net(first_time=True)
    merger = CallMerger(net, TIMES, [0] * 3)
    with pytest.warns(RuntimeWarning, match="does not read each row's own time"):
        out = run_threads(merger, merger, 3)
    assert not merger.enabled
    for i, calls in enumerate(out):
        for x, t, got in calls:  # each call alone: the right answer even for this network
            assert torch.allclose(got, net(x, t, y=torch.full((i + 1,), i)), atol=1e-6)
    assert max(net.rows[4:]) <= 3  # no merged call after the check


def test_a_failing_merged_call_raises_in_every_caller_and_nothing_hangs() -> None:
    merger = CallMerger(Net(fail_on=1), TIMES, [0] * 3)
    merger.verified = True  # the check would itself call the failing rows
    out = run_threads(merger, merger, 3)
    assert all(isinstance(o, RuntimeError) for o in out)


SD = dp.DiscreteVPSchedule()
MIX = dp.default_mixture(dim=6, num_classes=3, components_per_class=2, seed=5)
NET = dp.MixtureNetwork(MIX, SD, "eps")
Z = torch.randn(24, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
Y = torch.arange(24) % 3
COND = {"cond": {"y": Y}, "uncond": {"y": torch.full_like(Y, 3)}}


@pytest.mark.parametrize("lanes", [1, 2])
def test_tune_with_merged_calls_chooses_what_it_chooses_unmerged(lanes: int) -> None:
    kw = dict(schedule=SD, guidance_scale=5.0, nfe=[5, 6, 8], **COND, **FAST)
    plain = dp.tune(NET, Z, merge_lanes=0, **kw)
    merged = dp.tune(NET, Z, merge_lanes=lanes, **kw)

    def strip(p: dp.Profile) -> list[dict]:
        skip = ("seconds", "evaluations")
        return [{k: v for k, v in vars(c).items() if k not in skip} for c in p.choices]

    assert strip(merged) == strip(plain)
    assert merged.evaluations > 0


def test_merge_lanes_is_checked() -> None:
    with pytest.raises(ValueError, match="merge_lanes must be >= 0"):
        dp.tune(NET, Z, schedule=SD, nfe=[5], merge_lanes=-1, **FAST)


class Counting:
    """The mixture network, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, x: Tensor, t: Tensor, **kw: Tensor) -> Tensor:
        with self.lock:
            self.calls += 1
        return NET(x, t, **kw)


def test_merging_is_the_default_on_two_cpu_threads_and_fewer_workers_turn_it_off() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    calls = {}
    try:
        kw = dict(schedule=SD, guidance_scale=5.0, nfe=[5, 6, 8], tail_rows=0, **COND, **FAST)
        runs = {
            "default": {},
            "off": {"merge_lanes": 0},
            "one lane": {"merge_lanes": 1},
            "two workers": {"workers": 2},
        }
        for name, extra in runs.items():
            net = Counting()
            dp.tune(net, Z, **kw, **extra)
            calls[name] = net.calls
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    # two lanes: budget 8 alone in one, 6 and 5 merged in the other; one lane: all three
    assert calls["one lane"] < calls["default"] < calls["off"]
    assert calls["one lane"] < 0.6 * calls["off"]
    assert calls["two workers"] == calls["off"]
