"""retain_freed_memory: glibc keeps freed blocks, so a repeated large allocation stops
faulting its pages in; bad arguments name the parameter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpmsolver.allocator import ALLOCATOR_ENV, retain_freed_memory

# Page faults of 10 forwards of the built-in U-Net on 64 samples, in a fresh interpreter,
# with or without retain_freed_memory() first.
_PROBE = """
import resource, sys, torch
from dpmsolver.allocator import retain_freed_memory
kept = retain_freed_memory() if sys.argv[1] == "retain" else None
from dpmsolver.digits.load import load_default_model
torch.set_num_threads(1)
net = load_default_model()
x, t, y = torch.randn(64, 1, 8, 8), torch.full((64,), 500.0), torch.arange(64) % 11
with torch.no_grad():
    net(x, t, y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        net(x, t, y)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in __import__("os").environ.items() if k not in ALLOCATOR_ENV}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_faults() -> None:
    kept, retained = _faults("retain")
    _, plain = _faults("plain")
    assert kept == "True"
    # glibc's default gives the freed activations back: each forward faults them in again
    assert plain >= 10 * 1000
    assert retained < plain / 20


def test_bad_arguments_name_the_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="mmap_threshold"):
        retain_freed_memory(mmap_threshold=-1)
    with pytest.raises(ValueError, match="trim_threshold"):
        retain_freed_memory(trim_threshold=2**31)
    with pytest.raises(ValueError, match="arenas"):
        retain_freed_memory(arenas=0)
    with pytest.raises(TypeError, match="arenas"):
        retain_freed_memory(arenas=1.5)  # type: ignore[arg-type]


def test_a_user_set_allocator_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert retain_freed_memory() is False
