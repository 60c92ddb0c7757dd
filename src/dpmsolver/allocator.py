"""How the C allocator treats freed memory, for long CPU runs (tuning, sampling on the CPU).

A network's forward on the CPU allocates and frees activations of a few to tens of MiB per
call. glibc's ``malloc`` hands such blocks back to the kernel when they are freed (blocks
over ``M_MMAP_THRESHOLD`` are ``mmap``'d and unmapped; the heap top over
``M_TRIM_THRESHOLD`` is trimmed), so the next call faults every page in again, zeroed by
the kernel. On the built-in U-Net at 64 samples a call that is about 3000 page faults (12
MiB) per forward. :func:`retain_freed_memory` asks glibc to keep freed memory for reuse,
the effect that preloading jemalloc or tcmalloc has (PyTorch's CPU performance guide
recommends those): the process keeps its peak working set instead of giving it back
between calls. A library should not change the allocator of the process it runs in, so
only the command line (``dpmsolver ...``) and the benchmarks that time it call this;
a Python caller of :func:`dpmsolver.tune` may call it once at start.
"""

from __future__ import annotations

import ctypes
import os
import sys

from ._validate import check_int

__all__ = ["ALLOCATOR_ENV", "retain_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Environment variables through which a user already set glibc's allocator: where one is
#: set, :func:`retain_freed_memory` leaves the allocator as the user set it.
ALLOCATOR_ENV = (
    "GLIBC_TUNABLES",
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "LD_PRELOAD",
)


def retain_freed_memory(
    *,
    mmap_threshold: int = 32 * 2**20,
    trim_threshold: int = 2**30,
    arenas: int | None = 1,
) -> bool:
    """Ask glibc's ``malloc`` to keep freed memory for reuse (``mallopt``; module docstring).

    Args:
        mmap_threshold: blocks up to this many bytes come from the heap, not from their own
            ``mmap`` (glibc refuses more than its heap limit, 32-64 MiB on 64-bit Linux).
        trim_threshold: free memory at the heap's top is given back to the kernel only
            beyond this many bytes.
        arenas: the most malloc arenas (1: every thread allocates from the main heap, so
            the budgets that :func:`dpmsolver.tune` runs in threads reuse one pool of
            freed memory instead of each growing and trimming its own); None leaves it.

    Returns:
        True where every setting was taken: Linux with glibc, and none of
        :data:`ALLOCATOR_ENV` set (those mean the user chose the allocator). False, with
        nothing changed, elsewhere; False also where glibc refused a setting (those
        before it stay).
    """
    limits = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}
    for name, value in limits.items():
        if check_int(name, value, minimum=0) >= 2**31:
            raise ValueError(f"{name} must be below 2**31 bytes (a C int), got {value}")
    settings = [(_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)]
    if arenas is not None:
        settings.insert(0, (_M_ARENA_MAX, check_int("arenas", arenas, minimum=1)))
    if not sys.platform.startswith("linux") or any(os.environ.get(v) for v in ALLOCATOR_ENV):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in settings)
