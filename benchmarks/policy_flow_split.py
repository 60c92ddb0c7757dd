"""Would the default's procedure take a rectified-flow row of its own at low guidance?

The flow-only peer configurations (diffusers' schedulers on flow sigmas) are the ones the
untuned default does not beat on the held-out and fresh problems, while they blow up on the
selection problems at strong guidance. The procedure's "flow apart" granularities split the
flow rows at every guidance scale, and they blow up leave-one-out (benchmarks/policy.md).
This script scores the granularity in between. It is the chosen one ("one table, per w, NFE
thirds"), but with the flow family in rows of its own at the guidance scales listed. The
objective is the worst ratio, as the chosen rule's. Each is scored by the procedure's own
criterion: the worst left-out ratio over the selection problems (tied within 2x), then the
geometric mean of the left-out worsts. For reference it also prints the fitted table's worst
on the held-out and fresh problems, which are not used to choose.

Usage: python benchmarks/policy_flow_split.py  (seconds: it reads the recorded errors)
"""

from __future__ import annotations

from dataclasses import dataclass

from dpmsolver.bench.policy import (
    FAMILIES,
    GRANULARITIES,
    Granularity,
    Study,
    fit,
    leave_one_out,
    loo_worsts,
    policy_ratios,
    rows_from_text,
)
from dpmsolver.bench.records import read_text
from dpmsolver.bench.suite import rows_from_csv


@dataclass(frozen=True)
class FlowApartAt(Granularity):
    """The guidance and NFE groups given, every family in one row, except that at the
    guidance groups holding a scale of ``low`` the flow family has rows of its own."""

    low: tuple[float, ...] = ()

    def keys(self) -> list[tuple[tuple[str, ...], tuple[float, ...], tuple[int, ...]]]:
        others = tuple(f for f in FAMILIES if f != "flow")
        out = []
        for ws in self.guidance:
            apart = any(w in self.low for w in ws)
            groups = (others, ("flow",)) if apart else self.families
            out += [(g, ws, n) for g in groups for n in self.nfe]
        return out


def main() -> None:
    peers = rows_from_csv(read_text("benchmarks/suite_baseline.csv.gz"))
    rows, _ = rows_from_text(read_text("benchmarks/policy.csv.gz"))
    study = Study(rows, peers)
    sel = study.problems("selection")
    chosen = next(g for g in GRANULARITIES if g.name == "one table, per w, NFE thirds")
    print(
        "| flow rows of its own at w | LOO worst | in cell | geo-mean of the left-out worsts "
        "| held-out worst | fresh worst |"
    )
    print("|---|---|---|---|---|---|")
    for low in ((), (1.0,), (1.0, 3.0), (1.0, 3.0, 7.5)):
        g = FlowApartAt(chosen.name, chosen.families, chosen.guidance, chosen.nfe, low)
        res = leave_one_out(study.ratios, study.family, sel, g, study.candidates)
        worst, geo = loo_worsts(res)
        cell = max(res, key=lambda r: r.worst).cell
        table = fit(study.ratios, study.family, sel, g, study.candidates)
        split = [
            max(policy_ratios(table, study.ratios, study.family, study.problems(s)).values())
            for s in ("held_out", "fresh")
        ]
        name = ", ".join(f"{w:g}" for w in low) or "none (the chosen rule)"
        print(
            f"| {name} | {worst:.3g} | {cell[0]} w={cell[1]:g} NFE {cell[2]} | {geo:.3g} "
            f"| {split[0]:.3g} | {split[1]:.3g} |"
        )


if __name__ == "__main__":
    main()
