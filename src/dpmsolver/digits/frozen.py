"""Frozen TorchScript graphs for the built-in networks' inference on the CPU.

An eager forward of the built-in U-Net runs about 400 small operators, each dispatched from
Python with the global interpreter lock held. ``dpmsolver.tune`` calls the network from two
threads at once, mostly on 8-70 rows, so that overhead and the lock are a large part of a
call. :class:`FrozenGraph` traces a module's tensor function once per device, dtype and
state of the weights (``torch.jit.trace`` then ``torch.jit.freeze``, which folds the
weights in as constants) and runs the graph instead: the TorchScript interpreter releases
the lock for the whole call. The arithmetic is the same operators on the same tensors.

It is used only where the eager call would compute the same thing: no gradient recorded,
the module in eval mode, on the CPU, no forward hooks on any submodule, not while tracing
or scripting. The graph is rebuilt whenever a parameter or buffer was written in place or
replaced (their version counters and storages are the key), so training, an EMA update or
``load_state_dict`` never meet a stale copy. If tracing fails the eager call is used from
then on.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["FrozenGraph"]


class _Traced(nn.Module):
    """``fn`` of ``owner`` as a module's forward, for ``torch.jit.trace``."""

    def __init__(self, owner: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


class FrozenGraph:
    """Runs ``fn(*tensors)`` of ``owner`` through a frozen trace of it where that is the
    same call (module docstring), else eagerly. One per owner; a copy of the owner (e.g. an
    EMA copy made by ``copy.deepcopy``) gets an empty one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._graphs: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = {}
        self._broken = False

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenGraph:
        return FrozenGraph()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def __call__(
        self, owner: nn.Module, fn: Callable[..., torch.Tensor], *args: torch.Tensor
    ) -> torch.Tensor:
        """``fn(*args)``; ``fn`` reads ``owner``'s parameters and buffers, takes tensors and
        returns one, and the trace keeps only the batch dimension of ``args`` free."""
        x = args[0]
        if self._broken or not _eligible(owner, x):
            return fn(*args)
        where = (x.device, x.dtype, tuple(a.dtype for a in args))
        state = _state(owner)
        entry = self._graphs.get(where)
        if entry is None or entry[0] != state:
            with self._lock:
                entry = self._graphs.get(where)
                if entry is None or entry[0] != state:
                    try:
                        with warnings.catch_warnings():
                            # shapes read in Python (the map size a layer sees) are
                            # constants of the architecture; only the batch size varies
                            warnings.simplefilter("ignore", torch.jit.TracerWarning)
                            # TorchScript is deprecated for torch.compile, whose compile
                            # takes far longer on a few CPUs; a torch without it falls
                            # back to the eager call below
                            warnings.simplefilter("ignore", DeprecationWarning)
                            traced = torch.jit.trace(
                                _Traced(owner, fn).eval(), args, check_trace=False
                            )
                            graph = torch.jit.freeze(traced)
                    except Exception:  # any failure means: stay eager
                        self._broken = True
                        return fn(*args)
                    entry = (state, graph)
                    self._graphs[where] = entry
        return entry[1](*args)


def _eligible(owner: nn.Module, x: torch.Tensor) -> bool:
    """Whether the frozen graph computes what the eager call would (module docstring)."""
    if torch.is_grad_enabled() or owner.training or x.device.type != "cpu":
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    from torch.nn.modules import module as m

    if m._global_forward_hooks or m._global_forward_pre_hooks:
        return False
    return not any(s._forward_hooks or s._forward_pre_hooks for s in owner.modules())


def _state(owner: nn.Module) -> tuple[Any, ...]:
    """What the frozen constants were copied from: every parameter and buffer of the live
    module tree (a walk of its dicts, 4x cheaper than ``parameters()``), with its storage
    and version counter (an in-place write bumps the counter, a replacement or ``.to()``
    changes the storage). The tensors themselves are the key's last element: held with
    the graph, their storage cannot be freed and reused by a new tensor at the same
    address."""
    tensors: list[torch.Tensor] = []
    stack = [owner]
    while stack:
        m = stack.pop()
        for d in (m._parameters, m._buffers):
            tensors.extend(t for t in d.values() if t is not None)
        stack.extend(s for s in m._modules.values() if s is not None)
    return (*((t.data_ptr(), t._version) for t in tensors), _Held(tensors))


class _Held:
    """Tensors kept alive by a key, equal to any other (only the numbers compare)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Held)

    def __hash__(self) -> int:
        return 0
