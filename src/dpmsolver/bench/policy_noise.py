"""How much the leave-one-out score of :mod:`.policy` can be trusted: the decisive cells,
resampled.

:func:`.policy.choose_rule` compares rules by their worst left-out ratio. That number is
one cell's RMS error over 64 samples divided by the best peer's in the same cell. For the
best rule of each objective, this module finds the cell that decides its score (the
left-out problem's worst cell, and the recipe the rule fitted without that problem uses
there), reruns that recipe and every peer configuration there on the same 64 noises and
labels, and resamples the 64 samples with replacement (a bootstrap; Efron 1979): the
ratio's 5-95% range, and the share of the recipe's squared error that its single worst
sample carries. A wide range means two rules a few percent apart in that cell are not
measurably apart, which is why :data:`.policy.TIE_BAND` exists.

``python -m dpmsolver.bench.policy_noise [--csv benchmarks/policy.csv.gz] [--out
benchmarks/policy_noise.md]`` (about a minute).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .policy import (
    PEERS_CSV,
    POWERS,
    RULES,
    Study,
    candidates,
    choose_rule,
    fit,
    pick_rule,
    power_name,
    rows_from_text,
    run_recipe,
)
from .records import command_line, publish, read_text
from .suite import get_problem, rows_from_csv

__all__ = ["DecisiveCell", "bootstrap_cell", "decisive_cells", "main"]

Cell = tuple[str, float, int]


@dataclass(frozen=True)
class DecisiveCell:
    """The cell that decides one rule's leave-one-out score.

    Attributes:
        rule: the rule's name.
        cell: (problem, guidance, NFE), the left-out problem's worst cell.
        recipe: the candidate the rule, fitted without that problem, uses there.
        ratio: its recorded ratio to the best peer.
    """

    rule: str
    cell: Cell
    recipe: str
    ratio: float


def decisive_cells(study: Study) -> list[DecisiveCell]:
    """For the rule with the smallest worst left-out ratio (what :func:`.policy.pick_rule`
    keeps without a tie band), and for the rule it keeps at each objective of
    :data:`.policy.POWERS`: the cell of its worst left-out ratio."""
    sel = study.problems("selection")
    _, loo = choose_rule(study.ratios, study.family, sel, study.candidates)
    picks = [pick_rule(RULES, loo, band=1.0)]
    picks += [pick_rule([r for r in RULES if r.power == power], loo) for power in POWERS]
    out = []
    for rule in dict.fromkeys(picks):
        power = rule.power
        left = max(loo[rule.name], key=lambda x: x.worst)
        rest = [p for p in sel if p != left.problem]
        table = fit(study.ratios, study.family, rest, rule.granularity, study.candidates, power)
        p, w, n = left.cell
        out.append(DecisiveCell(rule.name, left.cell, table[(study.family[p], w, n)], left.worst))
    return out


def _per_sample(x: Tensor, ref: Tensor) -> Tensor:
    return ((x.double() - ref.double()) ** 2).flatten(1).mean(1)


def bootstrap_cell(
    cell: Cell, recipe: str, *, batch: int = 64, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float, float, float]:
    """Rerun ``recipe`` and every peer in ``cell`` on the suite's noise; returns the ratio
    to the best peer, its bootstrap 5%, 50% and 95% quantiles, and the share of the
    recipe's summed squared error that its worst sample carries."""
    from .peer_suite import run_peers

    name, w, nfe = cell
    p = get_problem(name)
    z, labels = p.noise(batch), p.labels(batch)
    x_T = p.x_T(z)
    den = p.denoiser(w, labels)
    ref = p.reference(den, x_T)
    known = candidates()
    if recipe not in known:
        raise ValueError(f"recipe: {recipe!r} is not a candidate of dpmsolver.bench.policy")
    x, spent = run_recipe(p, den, z, known[recipe], nfe)
    if x is None or spent != nfe:
        raise ValueError(f"recipe {recipe!r} cannot spend exactly {nfe} NFE on {name}")
    ours = _per_sample(x, ref)
    peers = torch.stack(
        [
            _per_sample(r.sample, ref)
            for r in run_peers(p, w, labels, x_T, nfe, denoiser=den)
            if r.sample is not None
        ]
    )  # (configurations, batch)
    full = float(ours.mean().sqrt() / peers.mean(1).sqrt().min())
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, batch, (resamples, batch), generator=gen)
    boot = ours[idx].mean(1).sqrt() / peers[:, idx].mean(2).sqrt().min(0).values
    q = torch.quantile(boot, torch.tensor([0.05, 0.5, 0.95], dtype=boot.dtype))
    share = float(ours.max() / ours.sum())
    return full, float(q[0]), float(q[1]), float(q[2]), share


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolver.bench.policy_noise [--csv FILE] [--peers FILE] [--out FILE]``."""
    ap = argparse.ArgumentParser(prog="python -m dpmsolver.bench.policy_noise")
    ap.add_argument("--csv", default="benchmarks/policy.csv.gz", help="the policy study's errors")
    ap.add_argument("--peers", default=PEERS_CSV, help=f"the peers' errors (default {PEERS_CSV})")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    from .policy import _quiet_diffusers

    _quiet_diffusers()
    torch.set_num_threads(1)
    start = time.perf_counter()
    study = Study(rows_from_text(read_text(args.csv))[0], rows_from_csv(read_text(args.peers)))
    seen: dict[tuple[Cell, str], tuple[float, float, float, float, float]] = {}
    lines = [
        "# How noisy the leave-one-out score is: the decisive cells, resampled\n",
        "For the rule with the smallest worst left-out ratio (first row), and the rule "
        "`dpmsolver.bench.policy` keeps at each objective, the cell that "
        "decides its worst left-out ratio, rerun (the recipe and every peer configuration, "
        "the same 64 noises and labels) and resampled 2000 times with replacement. "
        "'worst sample's share': the fraction of the recipe's summed squared error that its "
        "single worst sample carries.\n",
        "| rule | decisive cell | recipe there | recorded ratio | rerun | bootstrap 5% | "
        "median | 95% | worst sample's share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in decisive_cells(study):
        key = (d.cell, d.recipe)
        if key not in seen:
            seen[key] = bootstrap_cell(d.cell, d.recipe)
        full, lo, med, hi, share = seen[key]
        p, w, n = d.cell
        lines.append(
            f"| {d.rule} | {p} w={w:g} NFE {n} | `{d.recipe}` | {d.ratio:.3g} | {full:.3g} "
            f"| {lo:.3g} | {med:.3g} | {hi:.3g} | {share:.0%} |"
        )
    command = command_line("dpmsolver.bench.policy_noise", argv)
    lines.append(
        f"\nCommand: `{command}`; took {(time.perf_counter() - start) / 60:.1f} min on one "
        f"CPU thread. Objectives: {', '.join(power_name(p) for p in POWERS)}.\n"
    )
    text = "\n".join(lines)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
