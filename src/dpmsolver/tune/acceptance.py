"""Whether :func:`dpmsolver.tune` keeps a stage's choice.

:func:`_accept` is the held-out half's verdict (paired, no new divergence, optionally a
clear gain); the tail check (:func:`_tail_checked`, :func:`_walked_back`) compares a fitted
choice with stage (a)'s on the guard's noises, giving the far rows an exact reference; the
blow-up guard (:func:`_guarded`) takes the latest stage with the fewest samples thrown off
the data; :func:`_fallback` keeps the default recipe where nothing beat it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .comparison import _norms, _per_sample, clear_gain, no_new_divergence, paired_better
from .options import GUARD_REFERENCE_ROWS, PAIRED_GUARD_RULES, TuneOptions
from .pilot import _Choice, _Guard, _Problem


def _held_rows(c: _Choice) -> tuple[float, int]:
    """The sum of ``c``'s squared held-out errors, and their number."""
    return float(c.held.pow(2).sum()), len(c.held)


def _calibration_rows(prob: _Problem) -> Callable[[_Choice], tuple[float, int]]:
    """The sum of a choice's squared calibration errors, and their number."""
    return lambda c: (len(prob.cal) * c.cal**2, len(prob.cal))


def _tail_mse(
    prob: _Problem,
    guard: _Guard,
    choices: Sequence[_Choice],
    opts: TuneOptions,
    pilot: Callable[[_Choice], tuple[float, int]] = _held_rows,
    accept: bool = False,
) -> list[float] | None:
    """Each choice's mean squared error estimated over pilot rows (``pilot``: the sum of
    its squared errors there and their number; default the held-out half) and the guard's:
    all run from the guard's noises (``accept``: the runs stage (a) reads, :meth:`_Guard.
    samples`); the :attr:`TuneOptions.tail_rows` guard rows on which
    two of them end farthest apart, beyond ``tail_factor`` times the largest sum of those
    two's errors on a held-out row, get an exact reference; the other guard rows count at
    each choice's pilot mean. None where no guard row is that far apart (nothing to add to
    the pilot rows) or a choice cannot run."""
    runs = guard.runs_of(prob, choices, accept)
    if runs is None:
        return None
    apart = torch.zeros(len(guard.rows), dtype=torch.float64)
    usual = 0.0
    for i, j in itertools.combinations(range(len(choices)), 2):
        apart = torch.maximum(apart, _per_sample(runs[i], runs[j]))
        usual = max(usual, float((choices[i].held + choices[j].held).max()))
    order = apart.argsort(descending=True).tolist()
    far = [i for i in order if float(apart[i]) > opts.tail_factor * usual]
    if not far:
        return None
    return _estimated_mse(prob, guard, choices, runs, far[: opts.tail_rows], pilot)


def _estimated_mse(
    prob: _Problem,
    guard: _Guard,
    choices: Sequence[_Choice],
    runs: Sequence[Tensor],
    rows: list[int],
    pilot: Callable[[_Choice], tuple[float, int]],
) -> list[float]:
    """Each choice's mean squared error over the pilot rows ``pilot`` gives and all the
    guard rows: the guard rows ``rows`` against their exact reference, the others at the
    choice's pilot mean (``runs``: the choices' guard samples)."""
    ref = guard.reference(prob, rows) if rows else None
    others = len(guard.rows) - len(rows)

    def mse(c: _Choice, x: Tensor) -> float:
        total, n = pilot(c)
        tail = 0.0 if ref is None else float(_per_sample(x[rows], ref.to(x.device)).pow(2).sum())
        return (total + others * total / n + tail) / (n + len(guard.rows))

    return [mse(c, x) for c, x in zip(choices, runs, strict=True)]


def _tail_checked(
    prob: _Problem, guard: _Guard, chosen: _Choice, robust: _Choice, opts: TuneOptions
) -> _Choice:
    """``chosen`` or ``robust``, whichever has the smaller mean squared error estimated over
    the held-out rows and the guard's (:func:`_tail_mse`)."""
    mse = _tail_mse(prob, guard, [chosen, robust], opts)
    return robust if mse is not None and mse[1] < mse[0] else chosen


def _stage_a_takes(prob: _Problem, new: _Choice, old: _Choice, opts: TuneOptions) -> bool:
    """Whether stage (a) takes finalist ``new`` over ``old``: by the held-out half
    (:func:`_accept`), or with :attr:`TuneOptions.tail_accept`, where the guard's noises
    show a row on which the two end far apart, by the mean squared error :func:`_tail_mse`
    estimates over the held-out rows and the guard's, no held-out sample newly diverging."""
    if opts.tail_accept and prob.guard is not None and opts.tail_rows > 0:
        mse = _tail_mse(prob, prob.guard, [new, old], opts, accept=True)
        if mse is not None:
            return no_new_divergence(new.held, old.held, prob.spread) and mse[0] < mse[1]
    return _accept(new, old, prob, opts)


def _walked_back(
    prob: _Problem,
    guard: _Guard,
    later: Sequence[_Choice],
    refused: _Choice,
    robust: _Choice,
    opts: TuneOptions,
) -> _Choice:
    """The latest of the choices ``later`` (accepted after stage (a), up to ``refused``, the
    choice the tail check refused) that blows up no more guard samples than ``refused`` and
    that the tail check keeps against stage (a)'s ``robust``; ``robust`` if none
    (:attr:`TuneOptions.tail_walk_back`)."""
    limit = guard.blowups(prob, refused.recipe, refused.nfe)
    end = next(i for i, c in enumerate(later) if c is refused)
    for c in reversed(later[:end]):
        if c.recipe == robust.recipe or guard.blowups(prob, c.recipe, c.nfe) > limit:
            continue
        if _tail_checked(prob, guard, c, robust, opts) is c:
            return c
    return robust


def _guarded(
    guard: _Guard, prob: _Problem, taken: Sequence[_Choice], nfe: int, opts: TuneOptions
) -> tuple[_Choice, tuple[str, ...]]:
    """The latest of the stages' choices ``taken`` with the fewest guard blow-ups (with
    :attr:`TuneOptions.guard_rule` ``"mse"``, where that is not the last choice: the one
    of those run with the smallest :func:`_blowup_mse`; with ``"paired"``, the latest
    whose excess over that one does not stand, and with ``"paired_mse"`` whose estimated
    error is no larger either, :func:`_referee_keeps`), and the stages refused for it
    (latest first). The last choice runs first; earlier ones only while none is found
    without a blow-up."""
    counts = [guard.blowups(prob, taken[-1].recipe, nfe)]
    for c in reversed(taken[:-1]):
        if counts[-1] == 0:
            break
        counts.append(guard.blowups(prob, c.recipe, nfe))
    k = counts.index(min(counts))  # counts[k] is taken[-1 - k]: the first minimum is latest
    if k > 0 and opts.guard_rule == "mse":
        mse = _blowup_mse(prob, guard, [taken[-1 - i] for i in range(len(counts))])
        if mse is not None:
            k = mse.index(min(mse))
    elif k > 0 and opts.guard_rule in PAIRED_GUARD_RULES:
        fewest = taken[-1 - k]
        k = next(
            i for i in range(k + 1) if _referee_keeps(guard, prob, taken[-1 - i], fewest, opts)
        )
    return taken[-1 - k], tuple(c.stage for c in reversed(taken[len(taken) - k :]))


def _referee_keeps(
    guard: _Guard, prob: _Problem, later: _Choice, fewest: _Choice, opts: TuneOptions
) -> bool:
    """Whether :attr:`TuneOptions.guard_rule` ``"paired"`` (or ``"paired_mse"``) keeps
    ``later`` over ``fewest``, the choice with the fewest guard samples beyond the bound:
    its excess does not stand (:func:`_excess_stands`), and with ``"paired_mse"`` its mean
    squared error estimated over the held-out rows and the guard's, the rows beyond the
    bound under either given an exact reference (:func:`_blowup_mse`), is no larger."""
    if later is fewest:
        return True
    if _excess_stands(guard, prob, later, fewest, opts):
        return False
    if opts.guard_rule == "paired":
        return True
    mse = _blowup_mse(prob, guard, [later, fewest])
    return mse is not None and mse[0] <= mse[1]


def _excess_stands(
    guard: _Guard, prob: _Problem, later: _Choice, fewest: _Choice, opts: TuneOptions
) -> bool:
    """Whether ``later`` sends more guard samples beyond the bound than ``fewest`` by more
    than chance (:attr:`TuneOptions.guard_rule` ``"paired"``): a sign test on the samples
    beyond under one of them only, ``a - b >= guard_z * sqrt(a + b)``. A choice that cannot
    run stands refused."""
    runs = guard.runs_of(prob, [later, fewest])
    if runs is None:
        return True
    x, y = (guard.beyond(r) for r in runs)
    a, b = int((x & ~y).sum()), int((y & ~x).sum())
    return a > b and a - b >= opts.guard_z * math.sqrt(a + b)


def _fallback(
    prob: _Problem,
    guard: _Guard,
    finalists: Sequence[_Choice],
    default: _Choice,
    opts: TuneOptions,
) -> _Choice | None:
    """Stage (a)'s first finalist that the held-out half takes over the ``default`` recipe
    and that sends no more guard samples beyond the bound than it (None if none:
    :attr:`TuneOptions.guard_fallback`)."""
    limit = guard.blowups(prob, default.recipe, default.nfe)
    for f in finalists:
        if f.recipe == default.recipe or guard.blowups(prob, f.recipe, f.nfe) > limit:
            continue
        if _accept(f, default, prob, opts):
            return f
    return None


def _blowup_mse(prob: _Problem, guard: _Guard, choices: Sequence[_Choice]) -> list[float] | None:
    """Each choice's mean squared error estimated over the held-out rows and the guard's
    (:func:`_estimated_mse`), the guard rows beyond the bound under any of them (at most
    :data:`GUARD_REFERENCE_ROWS`, the farthest first) against their exact reference; None
    if a choice cannot run."""
    runs = guard.runs_of(prob, choices)
    if runs is None:
        return None
    far = torch.stack([guard.beyond(x) for x in runs]).any(0)
    farthest = torch.stack([_norms(x) for x in runs]).nan_to_num(math.inf).amax(0)
    order = farthest.argsort(descending=True).tolist()
    rows = [i for i in order if bool(far[i])][:GUARD_REFERENCE_ROWS]
    return _estimated_mse(prob, guard, choices, runs, rows, _held_rows)


def _accept(
    new: _Choice,
    old: _Choice,
    prob: _Problem,
    opts: TuneOptions,
    *,
    changed_only: bool = False,
) -> bool:
    """Kept only if it helps the held-out half (:func:`paired_better`, and by
    ``opts.accept_z`` standard errors: :func:`clear_gain`), no held-out sample newly
    diverges (:func:`no_new_divergence`) and, with ``opts.worst_factor``, the worst held-out
    sample does not end more than that factor farther than it did.
    ``changed_only``: the paired comparison runs on the held-out samples ``new`` changes
    (stage (d), which leaves most samples bit for bit: on all of them the median of the
    log-ratios is 0 and nothing could pass); none changed is no help."""
    worst = opts.worst_factor
    if worst is not None and float(new.held.max()) > worst * float(old.held.max()):
        return False
    rows = new.held != old.held if changed_only else torch.ones_like(new.held, dtype=torch.bool)
    if not bool(rows.any()):
        return False
    if not (
        no_new_divergence(new.held, old.held, prob.spread)
        and paired_better(new.held[rows], old.held[rows])
        and clear_gain(new.held[rows], old.held[rows], opts.accept_z)
    ):
        return False
    if prob.probes is None:
        return True
    # no more of the probes' arcs across a mode boundary, give or take the finest probe
    slack = prob.probes.resolution / prob.probes.pairs
    return new.probe_band(prob) <= old.probe_band(prob) + slack


def _kept(
    prob: _Problem,
    taken: list[_Choice],
    selected: _Choice,
    finalists: Sequence[_Choice],
    nfe: int,
    opts: TuneOptions,
) -> tuple[_Choice, tuple[str, ...]]:
    """What the blow-up guard and the tail check keep of the stages' accepted choices
    ``taken`` (the default first, the search's last; ``selected`` is stage (a)'s, or the
    default), and the stages they refused, latest first."""
    best = taken[-1]
    if prob.guard is None:
        return best, ()
    default = taken[0]
    best, refused = _guarded(prob.guard, prob, taken, nfe, opts)
    if opts.guard_fallback and refused and best is default:
        best = _fallback(prob, prob.guard, finalists, default, opts) or best
    k = next(i for i, c in enumerate(taken) if c is selected)
    past_a = any(c is best for c in taken[k + 1 :])  # a stage after (a), not refused
    if opts.tail_rows > 0 and past_a and best.recipe != selected.recipe:
        checked = _tail_checked(prob, prob.guard, best, selected, opts)
        if checked is not best and opts.tail_walk_back:
            checked = _walked_back(prob, prob.guard, taken[k + 1 :], best, selected, opts)
        if checked is not best:
            j = next(i for i, c in enumerate(taken) if c is checked)  # (a)'s or later
            later = (c.stage for c in reversed(taken[j + 1 :]))
            refused, best = tuple(dict.fromkeys((*refused, *later))), checked
    prob.guard.forget(nfe)
    return best, refused
