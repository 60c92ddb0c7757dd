"""Why did tune keep the untuned default in a cell? Stage (a)'s finalists and the verdicts.

In the blind rounds, the cells whose profile ends on the untuned default recipe (stage
"default": every stage refused) miss the best peer far more often than the others (round 7:
3 of 6 on the new noises, against 27 of 256 in all; round 6: 4 of 5). This re-tunes one such
cell and prints stage (a)'s finalists with their calibration and held-out errors, whether
the held-out half takes each over the default, and which stages the blow-up guard refused
(`TuneOptions.guard_rows`; benchmarks/guard_mse.md has the rules studied for it). Nothing is
chosen from it.

Usage: python benchmarks/guard_refusals.py PROBLEM W NFE  (a minute or two per cell)
"""

from __future__ import annotations

import importlib
import sys

import torch

from dpmsolver.bench.suite import get_problem
from dpmsolver.bench.tuned import tune_problem


def main(argv: list[str]) -> None:
    name, w, nfe = argv[0], float(argv[1]), int(argv[2])
    torch.set_num_threads(1)
    search = importlib.import_module("dpmsolver.tune.search")
    real_finalists, real_takes = search._finalists, search._stage_a_takes

    def finalists(prob, n, opts):  # type: ignore[no-untyped-def]
        out = real_finalists(prob, n, opts)
        for f in out:
            held = float(f.held.pow(2).mean().sqrt())
            print(f"finalist {f.recipe.describe()}: calibration {f.cal:.3g}, held-out {held:.3g}")
        return out

    def takes(prob, f, default, opts):  # type: ignore[no-untyped-def]
        taken = real_takes(prob, f, default, opts)
        held = float(default.held.pow(2).mean().sqrt())
        verdict = "takes" if taken else "refuses"
        print(f"  the held-out half {verdict} {f.recipe.solver} (default's held-out {held:.3g})")
        return taken

    search._finalists, search._stage_a_takes = finalists, takes
    c = tune_problem(get_problem(name), w, nfes=(nfe,), progress=False).choices[0]
    print(
        f"{name} w={w:g} NFE {nfe}: kept {c.recipe.describe()} (stage {c.stage}), held-out "
        f"{c.heldout_error:.3g}, the default's {c.default_heldout_error:.3g}; the guard "
        f"refused: {', '.join(c.guard_refused) or 'none'}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
