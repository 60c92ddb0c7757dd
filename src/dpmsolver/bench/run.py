"""``dpmsolver bench``: the benchmarks behind every number in the README, in one command.

1. *Error vs NFE* against the exact answer, ours and peers side by side, by guidance scale:
   on the exact Gaussian mixture (:func:`~.accuracy.mixture_problem`) and on the built-in
   digits network (:func:`~.accuracy.digits_problem`, reference from a Dormand-Prince
   solution of its ODE). Output: CSV, a markdown table of ``auto`` against the best peer
   configuration in every (NFE, guidance) cell, and an error-vs-NFE plot.
2. *Sample quality* on the digits network: class accuracy of conditional samples and the
   Frechet distance to held-out real digits (:mod:`~.quality`), by NFE and guidance.
3. *Thresholding and parameterization under strong guidance*: noise- vs data-prediction
   multistep solvers, with and without dynamic thresholding (each scored against the
   solution of its own ODE), the DPM-Solver++ paper's stability claim.
4. *Where the error comes from*: on a fresh mixture with 512 samples per cell, auto against
   the best peer by RMS and by the median sample, the worst sample's share of the RMS, and
   divergence (samples farther than ``DIVERGED`` from their exact sample).
5. *Per-step solver overhead* (network excluded) against diffusers'
   DPMSolverMultistepScheduler on the same tensor (:mod:`~.overhead`), on ``--device``.
6. *The ceiling of the search space*: on the held-out problems of section 1, the best of
   every candidate recipe :mod:`~.search` considers, picked on that very problem (an
   oracle), against the best peer: what no per-cell recipe table drawn from those
   candidates can beat.
7. *Optimized time steps* (:mod:`dpmsolver.calibrate`): auto's recipe with its knots fitted
   on other noise draws of the held-out mixture, scored on the benchmark's noise.

``--quick`` shrinks every size so the whole command runs in seconds (used by the tests);
the recorded results in ``benchmarks/`` come from the full run.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..auto import recommend
from ..calibrate import run_calibrated
from ..io import atomic_write, atomic_write_text
from ..recipe import Recipe
from .accuracy import (
    DIVERGED,
    GuidedProblem,
    Method,
    digits_problem,
    evaluate,
    mixture_problem,
    peer_methods,
    recipe_sample,
    rmse,
)
from .overhead import SHAPES as OVERHEAD_SHAPES
from .overhead import overhead_table

__all__ = ["auto_method", "main", "ours_method"]


def auto_method() -> Method:
    """``solver="auto"``: the recipe for each (NFE, guidance) cell."""

    def run(p: GuidedProblem, nfe: int) -> Tensor | None:
        return recipe_sample(p, nfe, recommend(nfe, p.guidance))

    return Method("auto", "ours", run)


def ours_method(solver: str, grid: str = "logsnr", **options: Any) -> Method:
    """One of our solvers on one grid (to the schedule's t_min, plain final step)."""

    def run(p: GuidedProblem, nfe: int) -> Tensor | None:
        return recipe_sample(p, nfe, Recipe(solver, dict(options), grid))  # type: ignore[arg-type]

    opts = "".join(f" {k}={v}" for k, v in options.items())
    return Method(f"{solver}{opts} [{grid}]", "ours", run)


# ----------------------------------------------------------------------------------------
# tables and plots
# ----------------------------------------------------------------------------------------


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def cell_table(rows: list[dict[str, Any]], nfes: Sequence[int]) -> str:
    """Markdown: per problem and NFE, auto's error, the best peer configuration's, ratio."""
    lines = []
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    lines.append("| problem | NFE | auto | best peer | peer configuration | auto / peer |")
    lines.append("|---|---|---|---|---|---|")
    for prob in problems:
        for nfe in nfes:
            cell = [r for r in rows if r["problem"] == prob and r["nfe"] == nfe]
            ours = [r for r in cell if r["method"] == "auto"]
            peers = [r for r in cell if r["source"] != "ours"]
            if not ours or not peers:
                continue
            best = min(peers, key=lambda r: r["error"])
            a, b = ours[0]["error"], best["error"]
            ratio = a / b if b > 0 and math.isfinite(b) else math.nan
            lines.append(f"| {prob} | {nfe} | {a:.2e} | {b:.2e} | {best['method']} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def plot_errors(rows: list[dict[str, Any]], path: Path) -> None:
    """Error vs NFE, one panel per problem: auto, the best peer per NFE, and every method faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 3.6), squeeze=False)
    for ax, prob in zip(axes[0], problems, strict=True):
        sub = [r for r in rows if r["problem"] == prob and math.isfinite(r["error"])]
        for m in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r["nfe"], r["error"]) for r in sub if r["method"] == m)
            if m == "auto":
                ax.plot(
                    *zip(*pts, strict=True), "o-", color="C3", lw=2, label="auto (ours)", zorder=5
                )
            else:
                color = (
                    "C0" if any(r["source"] == "ours" for r in sub if r["method"] == m) else "0.6"
                )
                ax.plot(*zip(*pts, strict=True), "-", color=color, lw=0.6, alpha=0.5)
        best: dict[int, float] = {}
        for r in sub:
            if r["source"] != "ours" and (r["nfe"] not in best or r["error"] < best[r["nfe"]]):
                best[r["nfe"]] = r["error"]
        if best:
            ax.plot(
                *zip(*sorted(best.items()), strict=True),
                "s--",
                color="k",
                label="best peer per NFE",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(prob, fontsize=9)
        ax.set_xlabel("NFE")
        ax.set_ylim(top=min(10.0, ax.get_ylim()[1]))
    axes[0][0].set_ylabel("RMS error vs exact")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    atomic_write(path, write)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Everything ``--quick`` shrinks."""

    nfes: tuple[int, ...] = (5, 6, 8, 10, 12, 15, 20, 25, 50)
    guidance: tuple[float, ...] = (1.0, 3.0, 7.5, 15.0)
    mixture_batch: int = 64
    mixture_seeds: tuple[int, ...] = (2,)
    digits_batch: int = 32
    digits_seed: int = 2
    digits_rtol: float = 1e-5
    quality_per_class: int = 50
    quality_nfes: tuple[int, ...] = (5, 10, 20, 100)
    quality_guidance: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)
    max_peers: int | None = None
    threshold_solvers: tuple[str, ...] = ("dpm_2m", "dpm_3m", "dpmpp_2m", "dpmpp_3m")
    overhead_shapes: tuple[tuple[int, ...], ...] = OVERHEAD_SHAPES
    overhead_repeats: int = 20
    tails_seed: int = 9
    tails_batch: int = 512
    # The digits network costs ~30 ms per evaluation here, so its ceiling covers the
    # issue's target cells (and the strongest guidance) only; the mixture covers them all.
    ceiling_digits_guidance: tuple[float, ...] = (7.5, 15.0)
    ceiling_digits_nfes: tuple[int, ...] = (5, 6, 8, 10)
    ceiling_candidates: int | None = None
    steps_guidance: tuple[float, ...] = (7.5, 15.0)
    steps_nfes: tuple[int, ...] = (5, 6, 8, 10)
    steps_batch: int = 1024
    steps_evals: int = 800


QUICK = Sizes(
    nfes=(5, 10),
    guidance=(7.5,),
    mixture_batch=8,
    digits_batch=2,
    digits_rtol=1e-2,
    quality_per_class=2,
    quality_nfes=(5, 10),
    quality_guidance=(3.0,),
    max_peers=3,
    threshold_solvers=("dpm_2m", "dpmpp_2m"),
    overhead_shapes=((1, 4, 16, 16),),
    overhead_repeats=2,
    tails_batch=16,
    ceiling_digits_guidance=(7.5,),
    ceiling_digits_nfes=(5,),
    ceiling_candidates=4,
    steps_guidance=(7.5,),
    steps_nfes=(6,),
    steps_batch=8,
    steps_evals=20,
)


SECTIONS = ("mixture", "digits", "quality", "thresholding", "tails", "overhead", "ceiling", "steps")


def _baselines() -> list[Method]:
    return [ours_method("dpmpp_2m"), ours_method("dpmpp_3m"), ours_method("unipc", order=2)]


def accuracy_section(problems: Iterable[GuidedProblem], sizes: Sizes, out: Path, stem: str) -> str:
    methods = [auto_method(), *_baselines(), *peer_methods()[: sizes.max_peers]]
    rows = evaluate(methods, problems, sizes.nfes)
    atomic_write_text(out / f"{stem}.csv", _csv(rows))
    table = cell_table(rows, sizes.nfes)
    atomic_write_text(out / f"{stem}.md", table)
    try:
        plot_errors(rows, out / f"{stem}.png")
    except ImportError:  # matplotlib is a demo/bench extra
        pass
    return table


def quality_section(sizes: Sizes, out: Path) -> str:
    """Class accuracy and Frechet distance of auto's digits by NFE and guidance (and the
    real Inception FID where torch-fidelity and its weights are present)."""
    from ..digits import load_classifier
    from ..model import sample_batches
    from ..models import load_builtin
    from .quality import (
        classify,
        frechet_distance,
        inception_fid,
        inception_fid_unavailable,
        real_digits,
    )

    device = torch.device("cpu")
    model = load_builtin(device)
    clf = load_classifier(device)
    real_x, _ = real_digits()
    _, real_f = classify(clf, real_x)
    labels = torch.arange(10).repeat_interleave(sizes.quality_per_class)
    no_fid = inception_fid_unavailable()
    rows = []
    for w in sizes.quality_guidance:
        for nfe in sizes.quality_nfes:
            t0 = time.perf_counter()
            x, spent = sample_batches(
                model,
                labels,
                len(labels),
                solver="auto",
                nfe=nfe,
                guidance=w,
                seed=0,
                batch=250,
                device=device,
            )
            pred, feats = classify(clf, x)
            rows.append(
                {
                    "guidance": w,
                    "nfe": nfe,
                    "spent": spent // math.ceil(len(labels) / 250),
                    "class_accuracy": float((pred == labels.numpy()).mean()),
                    "frechet_distance": frechet_distance(feats, real_f),
                    **(
                        {} if no_fid else {"inception_fid": inception_fid(x, real_x, device=device)}
                    ),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
    atomic_write_text(out / "quality_digits.csv", _csv(rows))
    fid_head, fid_rule = ("", "") if no_fid else (" Inception FID |", "---|")
    lines = [
        f"| guidance | NFE | class accuracy | Frechet distance (classifier features) |{fid_head}",
        f"|---|---|---|---|{fid_rule}",
    ]
    for r in rows:
        fid = "" if no_fid else f" {r['inception_fid']:.2f} |"
        lines.append(
            f"| {r['guidance']:g} | {r['nfe']} | {r['class_accuracy']:.3f} | "
            f"{r['frechet_distance']:.3f} |{fid}"
        )
    if no_fid:
        lines.append(f"\nInception FID not computed: {no_fid}.")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "quality_digits.md", table)
    return table


def thresholding_section(sizes: Sizes, out: Path) -> str:
    """Noise- vs data-prediction multistep at strong guidance, with and without dynamic
    thresholding; each run is scored against the exact solution of its own ODE."""
    w = max(sizes.guidance)
    methods = [
        ours_method(n, g) for n in sizes.threshold_solvers for g in ("logsnr", "time_uniform")
    ]
    rows: list[dict[str, Any]] = []
    for thresholded in (False, True):
        probs = [
            mixture_problem(w, thresholding=thresholded, batch=sizes.mixture_batch),
            digits_problem(
                w,
                thresholding=thresholded,
                batch=sizes.digits_batch,
                seed=sizes.digits_seed,
                rtol=sizes.digits_rtol,
            ),
        ]
        rows += evaluate(methods, probs, sizes.nfes)
    atomic_write_text(out / "thresholding.csv", _csv(rows))
    lines = [
        "| problem | method | " + " | ".join(f"NFE {n}" for n in sizes.nfes) + " |",
        "|---|---|" + "---|" * len(sizes.nfes),
    ]
    for prob in dict.fromkeys(r["problem"] for r in rows):
        for m in dict.fromkeys(r["method"] for r in rows):
            errs = {r["nfe"]: r["error"] for r in rows if r["problem"] == prob and r["method"] == m}
            lines.append(
                f"| {prob} | {m} | "
                + " | ".join(f"{errs.get(n, math.nan):.2e}" for n in sizes.nfes)
                + " |"
            )
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "thresholding.md", table)
    return table


def tails_section(sizes: Sizes, out: Path) -> str:
    """How the RMS error is made: on a mixture none of the recipes was chosen on, with many
    samples, auto against the best peer by RMS and by the median sample's error, and the
    share of the squared error carried by the single worst sample (a sample that lands in
    another mode than the exact solution dominates the RMS)."""
    probs = [
        mixture_problem(w, batch=sizes.tails_batch, seed=sizes.tails_seed) for w in sizes.guidance
    ]
    rows = evaluate(
        [auto_method(), *peer_methods()[: sizes.max_peers]], probs, sizes.nfes, per_sample=True
    )
    atomic_write_text(out / "tails.csv", _csv(rows))
    lines = [
        "| problem | NFE | auto RMS / best peer RMS | auto median / best peer median | auto "
        "worst-sample share | "
        "best-RMS peer's worst-sample share | auto worst sample | peers with a diverged sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    wins = {"error": 0, "median": 0}
    cells = auto_diverged = 0
    for prob in dict.fromkeys(r["problem"] for r in rows):
        for nfe in sizes.nfes:
            cell = [r for r in rows if r["problem"] == prob and r["nfe"] == nfe]
            auto = next((r for r in cell if r["method"] == "auto"), None)
            peers = [r for r in cell if r["method"] != "auto" and math.isfinite(r["error"])]
            if auto is None or not peers:
                continue
            best = {k: min(peers, key=itemgetter(k)) for k in wins}
            ratio = {k: auto[k] / best[k][k] for k in wins}
            cells += 1
            auto_diverged += auto["diverged"]
            for k in wins:
                wins[k] += ratio[k] <= 1.0
            peers_all = [r for r in cell if r["method"] != "auto"]
            lines.append(
                f"| {prob} | {nfe} | {ratio['error']:.2f} | {ratio['median']:.2f} | "
                f"{auto['worst_share']:.0%} | {best['error']['worst_share']:.0%} | "
                f"{auto['worst']:.2f} | "
                f"{sum(r['diverged'] > 0 for r in peers_all)} of {len(peers_all)} |"
            )
    lines.append(
        f"\nauto is at least as good as the best peer in {wins['error']} of {cells} cells by RMS "
        f"and in {wins['median']} of {cells} by the median sample's error "
        f"({sizes.tails_batch} samples per cell, mixture seed {sizes.tails_seed}). "
        f"auto samples that diverged (error above {DIVERGED:g}): {auto_diverged} of "
        f"{cells * sizes.tails_batch}."
    )
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "tails.md", table)
    return table


def overhead_section(sizes: Sizes, out: Path, device: str) -> str:
    """Per-step solver overhead (network excluded) against diffusers' DPM-Solver++(2M)."""
    table = overhead_table(
        device=device, shapes=sizes.overhead_shapes, repeats=sizes.overhead_repeats
    )
    atomic_write_text(out / "overhead.md", table)
    return table


def ceiling_section(sizes: Sizes, out: Path) -> str:
    """Per held-out cell: auto's error and the lowest error of auto or any candidate recipe
    of :func:`~.search.candidates` (chosen on the cell itself), each over the best peer's."""
    from .search import candidates, run_recipe  # search builds on this module

    recipes = candidates()[: sizes.ceiling_candidates]
    probs = [
        (mixture_problem(w, batch=sizes.mixture_batch, seed=sd), sizes.nfes)
        for w in sizes.guidance
        for sd in sizes.mixture_seeds
    ]
    probs += [
        (
            digits_problem(
                w, batch=sizes.digits_batch, seed=sizes.digits_seed, rtol=sizes.digits_rtol
            ),
            sizes.ceiling_digits_nfes,
        )
        for w in sizes.ceiling_digits_guidance
    ]
    rows: list[dict[str, Any]] = []
    for p, nfes in probs:
        peers = evaluate(peer_methods()[: sizes.max_peers], [p], nfes)
        for nfe in nfes:
            best_peer = min((r for r in peers if r["nfe"] == nfe), key=itemgetter("error"))
            auto = recommend(nfe, p.guidance)
            errors = [(run_recipe(p, r, nfe), r) for r in [auto, *recipes]]
            best_err, best = min(
                ((e, r) for e, r in errors if not math.isnan(e)), key=itemgetter(0)
            )
            rows.append(
                {
                    "problem": p.name,
                    "nfe": nfe,
                    "best_peer": best_peer["error"],
                    "best_peer_method": best_peer["method"],
                    "auto": errors[0][0],
                    "ceiling": best_err,
                    "ceiling_recipe": best.describe(),
                    "candidates": sum(not math.isnan(e) for e, _ in errors[1:]),
                }
            )
    atomic_write_text(out / "ceiling.csv", _csv(rows))
    lines = [
        "| problem | NFE | auto / best peer | best candidate / best peer | best candidate (chosen "
        "on this cell) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['problem']} | {r['nfe']} | {r['auto'] / r['best_peer']:.2f} | "
        f"{r['ceiling'] / r['best_peer']:.2f} | "
        f"`{r['ceiling_recipe']}` |"
        for r in rows
    ]
    lines.append(
        f"\nBest candidate: the lowest error of auto's recipe and {len(recipes)} candidate "
        f"recipes; best peer = the best of {len(peer_methods()[: sizes.max_peers])} peer "
        "configurations in the cell."
    )
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "ceiling.md", table)
    return table


def steps_section(sizes: Sizes, out: Path) -> str:
    """auto's recipe with knots calibrated (:func:`dpmsolver.calibrate.calibrate_steps`) on
    ``steps_batch`` other noises of the held-out mixture, scored on the benchmark's noise."""
    from ..calibrate import calibrate_steps

    rows: list[dict[str, Any]] = []
    for w in sizes.steps_guidance:
        for sd in sizes.mixture_seeds:
            p = mixture_problem(w, batch=sizes.mixture_batch, seed=sd)
            cal = mixture_problem(w, batch=sizes.steps_batch, seed=sd, noise_seed=5000 + sd)
            peers = evaluate(peer_methods()[: sizes.max_peers], [p], sizes.steps_nfes)
            for nfe in sizes.steps_nfes:
                best_peer = min((r for r in peers if r["nfe"] == nfe), key=itemgetter("error"))
                fit = calibrate_steps(
                    cal.denoiser,
                    cal.x_T,
                    cal.reference,
                    cal.schedule,
                    nfe,
                    guidance_scale=w,
                    max_evals=sizes.steps_evals,
                )
                x_auto = run_calibrated(p.denoiser, p.x_T, p.schedule, fit.recipe, nfe)
                x_fit = run_calibrated(p.denoiser, p.x_T, p.schedule, fit.recipe, nfe, fit.lams)
                rows.append(
                    {
                        "problem": p.name,
                        "nfe": nfe,
                        "recipe": fit.recipe.describe(),
                        "best_peer": best_peer["error"],
                        "auto": math.inf if x_auto is None else rmse(x_auto, p.reference),
                        "calibrated": math.inf if x_fit is None else rmse(x_fit, p.reference),
                        "fit_start": fit.start_error,
                        "fit_end": fit.error,
                        "validation_start": fit.validation_start,
                        "validation_end": fit.validation_error,
                        "accepted": fit.accepted,
                        "sigmas": " ".join(f"{v:.4g}" for v in fit.sigmas),
                    }
                )
    atomic_write_text(out / "steps.csv", _csv(rows))
    lines = [
        "| problem | NFE | auto / best peer | calibrated auto / best peer | fit half: auto -> "
        "fitted | "
        "validation half: auto -> fitted | fit kept | calibrated sigmas |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['problem']} | {r['nfe']} | {r['auto'] / r['best_peer']:.2f} | "
        f"{r['calibrated'] / r['best_peer']:.2f} | "
        f"{r['fit_start']:.2e} -> {r['fit_end']:.2e} | {r['validation_start']:.2e} -> "
        f"{r['validation_end']:.2e} | "
        f"{'yes' if r['accepted'] else 'no'} | {r['sigmas']} |"
        for r in rows
    ]
    lines.append(
        f"\nCalibration: {sizes.steps_batch} other noise draws of the same mixture (half fitted by "
        f"Nelder-Mead, at most {sizes.steps_evals} sampler runs; half for validation); scored on "
        "the "
        f"benchmark's {sizes.mixture_batch} samples."
    )
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "steps.md", table)
    return table


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = int(v) if v.isdigit() else float(v)
            except ValueError:
                pass
    return rows


def ratio_matrix(rows: list[dict[str, Any]]) -> str:
    """Markdown matrix, NFE by guidance: auto's error / the best peer configuration's."""

    def guidance(prob: str) -> float:
        return float(prob.split("w=")[1].split()[0])

    probs = sorted(dict.fromkeys(r["problem"] for r in rows), key=guidance)
    nfes = sorted({r["nfe"] for r in rows})
    head = "| NFE | " + " | ".join(f"w = {guidance(p):g}" for p in probs) + " |"
    lines = [head, "|---|" + "---|" * len(probs)]
    for nfe in nfes:
        cells = []
        for p in probs:
            cell = [r for r in rows if r["problem"] == p and r["nfe"] == nfe]
            ours = [r["error"] for r in cell if r["method"] == "auto"]
            peers = [r["error"] for r in cell if r["source"] != "ours"]
            if not ours or not peers:
                cells.append("")
                continue
            a, b = ours[0], min(peers)
            ratio = a / b if b > 0 else math.inf
            mark = "**" if ratio <= 0.5 else ""
            cells.append(f"{a:.1e} / {b:.1e} = {mark}{ratio:.2f}{mark}")
        lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def summarize(out: Path) -> str:
    """The README summary from the CSVs a full run left in ``out``."""
    parts = []
    for stem, title in (
        ("accuracy_mixture", "Exact Gaussian mixture"),
        ("accuracy_digits", "Built-in digits network"),
    ):
        path = out / f"{stem}.csv"
        if path.exists():
            parts.append(
                f"**{title}** (auto error / best peer error = ratio; bold: at most half):\n\n"
                + ratio_matrix(_read_csv(path))
            )
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks and write their outputs under ``--out``."""
    p = argparse.ArgumentParser(prog="dpmsolver bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` options (shared by ``dpmsolver bench`` and ``python -m``)."""
    p.add_argument(
        "--out",
        default="benchmarks",
        help="output directory (default benchmarks/; created, parents too, if missing)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: seconds, not minutes (for tests)"
    )
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections: {', '.join(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--device", default="cpu", help="device for the overhead section (cpu, cuda, cuda:N, auto)"
    )
    p.add_argument(
        "--readme",
        help=f"also write the summary matrices into this file, between its {README_START} and "
        f"{README_END} lines",
    )
    p.add_argument(
        "--summarize", action="store_true", help="only rebuild the summary from the CSVs in --out"
    )


def run(args: argparse.Namespace) -> int:
    """Execute the sections named in ``args.only``."""
    out = Path(args.out)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            raise ValueError(f"--only: unknown section {s!r}; accepted: {', '.join(SECTIONS)}")
    from ..model import resolve_device  # the CLI's own --device rule (cpu, cuda, cuda:N, auto)

    device = str(resolve_device(args.device, "--device"))  # checked before hours of work, not after
    # Every output location too: the summary goes into --readme after all the work.
    from ..io import check_writable_dir, check_writable_file

    if args.readme:
        readme = Path(args.readme)
        if not readme.is_file():
            raise ValueError(f"--readme: {str(readme)!r} is not a file")
        check_writable_file(readme, "--readme")
        try:
            text = readme.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--readme: cannot read {str(readme)!r} ({e})") from None
        i, j = text.find(README_START), text.find(README_END)
        if i < 0 or j < i:
            raise ValueError(
                f"--readme: {str(readme)!r} lacks the {README_START} ... {README_END} lines "
                "that the summary goes between"
            )
    if args.summarize and not out.is_dir():
        raise ValueError(f"--out: {str(out)!r} is not a directory (--summarize reads its CSVs)")
    check_writable_dir(out, "--out", create=True)
    if args.summarize:
        _write_summary(out, args.readme)
        return 0
    sizes = QUICK if args.quick else Sizes()
    # One intra-op thread on CPU: on a shared machine extra threads mostly wait on each
    # other (10-20x slower for these small tensors), and results stay reproducible.
    torch.set_num_threads(1)
    report = []
    if "mixture" in sections:
        probs = [
            mixture_problem(w, batch=sizes.mixture_batch, seed=sd)
            for w in sizes.guidance
            for sd in sizes.mixture_seeds
        ]
        report.append(
            "## Exact mixture\n\n" + accuracy_section(probs, sizes, out, "accuracy_mixture")
        )
    if "digits" in sections:
        probs = [
            digits_problem(
                w, batch=sizes.digits_batch, seed=sizes.digits_seed, rtol=sizes.digits_rtol
            )
            for w in sizes.guidance
        ]
        report.append(
            "## Digits network\n\n" + accuracy_section(probs, sizes, out, "accuracy_digits")
        )
    if "quality" in sections:
        report.append("## Digits sample quality (auto)\n\n" + quality_section(sizes, out))
    if "thresholding" in sections:
        report.append("## Thresholding at strong guidance\n\n" + thresholding_section(sizes, out))
    if "tails" in sections:
        report.append("## Where the error comes from\n\n" + tails_section(sizes, out))
    if "overhead" in sections:
        report.append("## Per-step solver overhead\n\n" + overhead_section(sizes, out, device))
    if "ceiling" in sections:
        report.append("## Ceiling of the search space\n\n" + ceiling_section(sizes, out))
    if "steps" in sections:
        report.append("## Optimized time steps\n\n" + steps_section(sizes, out))
    text = "\n".join(report)
    sys.stdout.write(text)
    _write_summary(out, args.readme)
    return 0


def _write_summary(out: Path, readme: str | None) -> None:
    summary = summarize(out)
    atomic_write_text(out / "summary.md", summary)
    if readme:
        text = Path(readme).read_text(encoding="utf-8")
        i, j = text.index(README_START), text.index(README_END)
        atomic_write_text(readme, text[: i + len(README_START)] + "\n" + summary + text[j:])


if __name__ == "__main__":
    raise SystemExit(main())
