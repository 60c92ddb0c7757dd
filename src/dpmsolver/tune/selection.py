"""Stage (a) of :func:`dpmsolver.tune`: the solver and grid family.

Every candidate (:data:`~dpmsolver.tune.options.TUNE_SOLVERS` x grid families) is screened
on a few calibration rows, the best few run on all of them and are ranked by calibration
error, or by the tail estimate where it finds the first finalist clearly worse
(:func:`_tail_ranked`); the first the held-out half takes over the default is chosen."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..plan import lower_order_final_default
from ..recipe import Recipe
from .acceptance import _calibration_rows, _tail_mse
from .comparison import _rms
from .options import TuneOptions, grid_families
from .pilot import _Choice, _choice, _Problem


def _candidate(
    name: str,
    options: Mapping[str, Any],
    kind: str,
    rho: float | None,
    nfe: int,
    sigma_max: float | None = None,
) -> Recipe | None:
    """A stage (a) candidate; ``options`` may hold the recipe's ``lower_order_final``
    besides the solver's options (None where the default rule already lowers the last
    orders at ``nfe``: the candidate without it is the same run)."""
    opts = dict(options)
    lof = opts.pop("lower_order_final", None)
    if lof and lower_order_final_default(nfe):
        return None
    return Recipe(
        name,
        opts,
        grid=kind,  # type: ignore[arg-type]
        rho=rho,
        lower_order_final=lof,
        sigma_max=sigma_max,
    )


def _screened(prob: _Problem, nfe: int, opts: TuneOptions) -> list[tuple[float, Recipe]]:
    """Stage (a)'s screen: every candidate (``opts.solvers`` x ``opts.grids``, and on a
    schedule that starts at pure noise the grids spaced in noise level entered at
    ``opts.flow_sigma_max`` too) that spends exactly ``nfe``, with its RMS error on the
    first ``opts.screen_rows`` calibration rows, best first."""
    screen = prob.cal[: opts.screen_rows]
    scored: list[tuple[float, Recipe]] = []
    for name, options in opts.solvers:
        if name == "dpmv3" and opts.v3_max_nfe is not None and nfe > opts.v3_max_nfe:
            continue
        for kind, rho, sigma_max in grid_families(prob.schedule, opts):
            r = _candidate(name, options, kind, rho, nfe, sigma_max)
            if r is None:
                continue
            x = prob.run(r, nfe, screen)
            if x is not None:
                scored.append((_rms(x, prob.reference[screen]), r))
    scored.sort(key=lambda e: e[0])
    return scored


def _tail_ranked(prob: _Problem, finalists: list[_Choice], opts: TuneOptions) -> list[_Choice]:
    """Stage (a)'s finalists (ranked) re-ranked by the error :func:`_tail_mse` estimates
    over the calibration rows and the guard's (the held-out half stays the independent
    check), where the guard's noises show a far sample that the pilot did not (unchanged
    where none, or without a guard: :attr:`TuneOptions.tail_ranking`)."""
    factor = opts.tail_ranking
    live = [c for c in finalists if bool(torch.isfinite(c.held).all())]
    if prob.guard is None or factor is None or opts.tail_rows == 0 or len(live) < 2:
        return finalists
    if opts.tail_trigger == "disagree" and _held_first(live) is live[0]:
        return finalists
    mse = _tail_mse(prob, prob.guard, live, opts, _calibration_rows(prob))
    if mse is None or (factor > 1.0 and mse[0] <= factor**2 * min(mse)):
        return finalists
    ranked = [c for _, _, c in sorted(zip(mse, range(len(live)), live, strict=True))]
    return ranked + [c for c in finalists if all(c is not r for r in ranked)]


def _held_first(choices: Sequence[_Choice]) -> _Choice:
    """The choice with the smallest held-out RMS error (the first of equals)."""
    return min(choices, key=lambda c: float(c.held.pow(2).mean()))


def _ranked(prob: _Problem, finalists: list[_Choice], opts: TuneOptions) -> list[_Choice]:
    """Stage (a)'s finalists, best first, on the rows ``opts.rank_rows`` names."""
    if opts.rank_rows == "calibration":
        return sorted(finalists, key=lambda c: c.cal)
    if opts.rank_rows == "worse":
        return sorted(finalists, key=lambda c: c.worse_half())
    return sorted(finalists, key=lambda c: c.pooled(len(prob.cal)))


def _finalists(prob: _Problem, nfe: int, opts: TuneOptions) -> list[_Choice]:
    """Stage (a)'s finalists for budget ``nfe``, in ranking order: every candidate screened
    on a few calibration rows, the ``opts.finalists`` best run on all of them and ranked."""
    scored = _screened(prob, nfe, opts)
    finalists = [_choice(prob, r, nfe, "selection") for _, r in scored[: opts.finalists]]
    return _tail_ranked(prob, _ranked(prob, finalists, opts), opts)
