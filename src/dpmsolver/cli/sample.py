"""``dpmsolver sample`` and ``dpmsolver compare``: images from a model, and the same seeds
through several solvers and budgets."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import atomic_write
from ..model import LoadedModel, evaluations, sample_batches
from ..models import load_model
from ..recipe import POLICIES
from .options import (
    UsageError,
    add_budget_options,
    add_ems,
    add_guidance,
    add_model,
    budget_problem,
    check_budget_options,
    check_ems,
    check_guidance,
    check_output,
    check_solver,
    describe,
    device,
    ems_budget,
    ems_option,
    ems_recipe,
    int_list,
    is_adaptive,
    load_ems,
    positive_int,
    resolve_budget,
    resolve_guidance,
    solver_help,
)
from .tune import add_profile_option, resolve_profile

__all__ = ["add_parsers", "cmd_compare", "cmd_sample"]


def _labels(args: argparse.Namespace, model: LoadedModel) -> Tensor | None:
    if model.num_classes is None:
        if args.labels is not None:
            raise UsageError("--labels given but the model is not class-conditional")
        return None
    if args.labels is not None:
        labels = int_list("--labels", args.labels, lo=0, hi=model.num_classes - 1)
    else:
        labels = [c for c in range(model.num_classes) for _ in range(args.per_class)]
    return torch.tensor(labels, dtype=torch.long)


def cmd_sample(args: argparse.Namespace) -> int:
    ems = ems_option(args)  # first: with --ems, --solver auto means dpmv3
    check_budget_options(args)
    check_guidance(args.guidance)
    out_png = Path(args.out) if args.out else None
    out_npz = Path(args.npz) if args.npz else None
    if out_png is None and out_npz is None:
        raise UsageError("nothing to write: give --out and/or --npz")
    for p, opt in ((out_png, "--out"), (out_npz, "--npz")):
        if p is not None:
            check_output(p, opt)
    dev = device(args.device)
    model = load_model(args.model, dev, null_label=args.null_label)
    guidance = resolve_guidance(model, args.guidance)
    labels = _labels(args, model)
    profile, tuned = resolve_profile(args, model, guidance)
    budget = tuned or resolve_budget(model, args)
    if ems is not None:
        budget = ems_budget(budget, ems, args.ems, model, guidance)
    n = len(labels) if labels is not None else args.num
    t0 = time.perf_counter()
    x, spent = sample_batches(
        model,
        labels,
        n,
        solver=budget.solver,
        nfe=budget.nfe,
        steps=budget.steps,
        guidance=guidance,
        seed=args.seed,
        batch=args.batch,
        device=dev,
        grid=args.grid,
        progress=not args.no_progress,
        profile=profile,
    )
    elapsed = time.perf_counter() - t0
    if not bool(torch.isfinite(x).all()):
        print("dpmsolver: error: sampling produced NaN/Inf; nothing was written", file=sys.stderr)
        return 1
    if out_png is not None:
        from ..images import grid_from_samples, write_png

        nrow = (
            model.num_classes
            if (labels is not None and args.labels is None and model.num_classes)
            else int(np.ceil(np.sqrt(n)))
        )
        order = _column_order(labels, model) if args.labels is None and labels is not None else None
        xs = x[order] if order is not None else x
        write_png(
            out_png, grid_from_samples(xs, nrow, scale=args.scale, value_range=model.value_range)
        )
    if out_npz is not None:
        arrays = {"samples": x.numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]

        atomic_write(out_npz, write)
    written = ", ".join(str(p) for p in (out_png, out_npz) if p is not None)
    note = f" ({budget.note})" if budget.note else ""
    print(
        f"{n} samples from {model.name} with {args.solver}, guidance {guidance:g}: "
        f"{describe(budget, args)}{note}, {spent} batched network calls in {elapsed:.1f}s -> "
        f"{written}"
    )
    return 0


def _column_order(labels: Tensor, model: LoadedModel) -> list[int]:
    """Reorder class-major samples so each grid column is one class."""
    assert model.num_classes is not None
    per = len(labels) // model.num_classes
    return [c * per + r for r in range(per) for c in range(model.num_classes)]


# ----------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    if not solvers:
        raise UsageError("--solvers must not be empty")
    for s in solvers:
        check_solver(s, "--solvers")
        if is_adaptive(s):
            raise UsageError(
                f"--solvers: {s} is adaptive (it chooses its own budget), so it has no column "
                f"in a comparison by budget; sample it with `dpmsolver sample --solver {s}`"
            )
    check_guidance(args.guidance)
    if args.steps is not None:
        budgets = [("steps", k) for k in int_list("--steps", args.steps, lo=1)]
    else:
        budgets = [("nfe", k) for k in int_list("--nfe", args.nfe or "5,10,20", lo=1)]
    out = Path(args.out)
    check_output(out, "--out")
    ems = load_ems(args.ems) if args.ems is not None else None
    if ems is not None and "dpmv3" not in solvers:
        solvers.append("dpmv3")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "compare draws a labelled figure with matplotlib: pip install matplotlib"
        ) from None
    dev = device(args.device)
    model = load_model(args.model, dev, null_label=args.null_label)
    guidance = resolve_guidance(model, args.guidance)
    if ems is not None:
        check_ems(ems, args.ems, model, guidance)
    labels = torch.arange(model.num_classes) if model.num_classes else None
    n = len(labels) if labels is not None else args.num
    fig, axes = plt.subplots(
        len(solvers),
        len(budgets),
        figsize=(2.2 * len(budgets), 1.0 + 0.45 * len(solvers) * 2),
        squeeze=False,
    )
    from ..images import grid_from_samples

    for i, s in enumerate(solvers):
        for j, (kind, k) in enumerate(budgets):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            title = f"{k} NFE" if kind == "nfe" else f"{k} steps"
            why = _cell_problem(model, s, kind, k)
            if why is None:
                x, _ = sample_batches(
                    model,
                    labels,
                    n,
                    solver=ems_recipe(ems, model, guidance, k)
                    if ems is not None and s == "dpmv3"
                    else s,
                    guidance=guidance,
                    seed=args.seed,
                    batch=n,
                    device=dev,
                    nfe=k if kind == "nfe" else None,
                    steps=k if kind == "steps" else None,
                )
                img = grid_from_samples(x, min(n, 10), scale=2, value_range=model.value_range)
                ax.imshow(
                    img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255
                )
            else:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=8)
                print(f"compare: {s} at {title}: n/a: {why}", file=sys.stderr)
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                name = f"{s} + EMS" if ems is not None and s == "dpmv3" else s
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(f"{model.name}, guidance {guidance:g}, seed {args.seed}", fontsize=9)
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    atomic_write(out, write)
    plt.close(fig)
    print(f"compared {len(solvers)} solvers x {len(budgets)} budgets -> {out}")
    return 0


def _cell_problem(model: LoadedModel, solver: str, kind: str, k: int) -> str | None:
    """Why ``solver`` cannot run a compare cell (None if it can)."""
    if kind == "nfe":
        return budget_problem(model, solver, k, None)[0]
    if solver in POLICIES:
        return f"{solver} chooses its steps for an evaluation budget (compare with --nfe)"
    try:
        evaluations(model, solver, steps=k)
    except ValueError as e:
        return str(e)
    return None


def add_parsers(sub: Any) -> None:
    """Register ``sample`` and ``compare`` on the CLI's subparsers."""
    s = sub.add_parser(
        "sample",
        help="sample a grid of images",
        description=textwrap.fill(
            "Sample from the built-in digits model (default), a local diffusers model "
            "directory or a model factory."
        ),
        epilog=solver_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(s)
    s.add_argument(
        "--solver",
        default="auto",
        help="solver name or alias, or 'auto' (default); listed below",
    )
    add_budget_options(s, adaptive=True)
    add_guidance(s)
    add_ems(s)
    s.add_argument(
        "--labels",
        default=None,
        help="comma-separated class labels (default: every class, --per-class each)",
    )
    s.add_argument(
        "--per-class",
        type=positive_int("--per-class"),
        default=4,
        help="samples per class when --labels is not given (default 4)",
    )
    s.add_argument(
        "--num",
        type=positive_int("--num"),
        default=16,
        help="samples for an unconditional model (default 16)",
    )
    s.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed; sample i's noise depends only on (seed, i) (default 0)",
    )
    s.add_argument(
        "--batch", type=positive_int("--batch"), default=64, help="batch size (default 64)"
    )
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    s.add_argument(
        "--out", default="samples.png", help="PNG grid to write (default samples.png; '' for none)"
    )
    s.add_argument("--npz", default=None, help="also write samples (and labels) to this .npz")
    s.add_argument(
        "--scale",
        type=positive_int("--scale"),
        default=4,
        help="pixel upscaling in the PNG (default 4)",
    )
    add_profile_option(s)
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser(
        "compare",
        help="same seeds through several solvers and budgets",
        description=textwrap.fill(
            "One labelled grid: rows are solvers, columns budgets (NFE or steps), same "
            "seeds everywhere. A cell a solver cannot run is marked n/a, with the reason on stderr."
        ),
        epilog=solver_help(adaptive=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(c)
    c.add_argument(
        "--solvers",
        default="auto,dpmpp_2m,dpmpp_3m,ddim",
        help="comma-separated solvers, not adaptive ones (default auto,dpmpp_2m,dpmpp_3m,ddim)",
    )
    budgets = c.add_mutually_exclusive_group()
    budgets.add_argument("--nfe", default=None, help="comma-separated budgets (default 5,10,20)")
    budgets.add_argument(
        "--steps", default=None, help="comma-separated grid steps instead of --nfe budgets"
    )
    add_guidance(c)
    add_ems(c, rows=True)
    c.add_argument("--num", type=positive_int("--num"), default=10)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.add_argument("--out", default="compare.png", help="PNG to write (default compare.png)")
    c.set_defaults(func=cmd_compare)
