"""``dpmsolver sample`` and ``dpmsolver compare``: images from a model, and the same seeds
through several solvers and budgets."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import atomic_write
from ..model import LoadedModel, sample_batches
from ..models import load_model
from .options import UsageError, check_output, check_solver, device, int_list, positive_int

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
    check_solver(args.solver)
    if args.guidance < 0 or not np.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    out_png = Path(args.out) if args.out else None
    out_npz = Path(args.npz) if args.npz else None
    if out_png is None and out_npz is None:
        raise UsageError("nothing to write: give --out and/or --npz")
    for p, opt in ((out_png, "--out"), (out_npz, "--npz")):
        if p is not None:
            check_output(p, opt)
    dev = device(args.device)
    model = load_model(args.model, dev)
    labels = _labels(args, model)
    n = len(labels) if labels is not None else args.num
    t0 = time.perf_counter()
    x, spent = sample_batches(
        model,
        labels,
        n,
        solver=args.solver,
        nfe=args.nfe,
        guidance=args.guidance,
        seed=args.seed,
        batch=args.batch,
        device=dev,
        grid=args.grid,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - t0
    if not bool(torch.isfinite(x).all()):
        raise RuntimeError("sampling produced NaN/Inf; nothing was written")
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
    print(
        f"{n} samples from {model.name} with {args.solver}, guidance {args.guidance:g}: "
        f"{args.nfe} network evaluations per sample ({spent} batched calls) in {elapsed:.1f}s -> "
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
    nfes = int_list("--nfe", args.nfe, lo=1)
    out = Path(args.out)
    check_output(out, "--out")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "compare draws a labelled figure with matplotlib: pip install matplotlib"
        ) from None
    dev = device(args.device)
    model = load_model(args.model, dev)
    labels = torch.arange(model.num_classes) if model.num_classes else None
    n = len(labels) if labels is not None else args.num
    fig, axes = plt.subplots(
        len(solvers),
        len(nfes),
        figsize=(2.2 * len(nfes), 1.0 + 0.45 * len(solvers) * 2),
        squeeze=False,
    )
    from ..images import grid_from_samples

    for i, s in enumerate(solvers):
        for j, k in enumerate(nfes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            try:
                x, _ = sample_batches(
                    model,
                    labels,
                    n,
                    solver=s,
                    nfe=k,
                    guidance=args.guidance,
                    seed=args.seed,
                    batch=n,
                    device=dev,
                )
                img = grid_from_samples(x, min(n, 10), scale=2, value_range=model.value_range)
                ax.imshow(
                    img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255
                )
            except ValueError as e:  # e.g. a budget a singlestep solver cannot spend
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=8)
                print(f"{s} at {k} NFE: {e}", file=sys.stderr)
            if i == 0:
                ax.set_title(f"{k} NFE", fontsize=9)
            if j == 0:
                ax.set_ylabel(s, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(f"{model.name}, guidance {args.guidance:g}, seed {args.seed}", fontsize=9)
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    atomic_write(out, write)
    plt.close(fig)
    print(f"compared {len(solvers)} solvers x {len(nfes)} budgets -> {out}")
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``sample`` and ``compare`` on the CLI's subparsers."""
    s = sub.add_parser(
        "sample",
        help="sample a grid of images",
        description="Sample from the built-in digits model (default) or a local diffusers model "
        "directory.",
    )
    s.add_argument(
        "--model",
        default="builtin",
        help="'builtin' (default) or a diffusers model directory with unet/ and scheduler/",
    )
    s.add_argument(
        "--solver",
        default="auto",
        help="solver name or alias, or 'auto' (default; see `dpmsolver solvers`)",
    )
    s.add_argument(
        "--nfe",
        type=positive_int("--nfe"),
        default=10,
        help="network evaluations per sample (default 10)",
    )
    s.add_argument(
        "--grid", default=None, help="time grid (default: the solver's recommendation, else logsnr)"
    )
    s.add_argument(
        "--guidance",
        type=float,
        default=3.0,
        help="classifier-free guidance scale (default 3; 1 = none)",
    )
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
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser(
        "compare",
        help="same seeds through several solvers and budgets",
        description="One labelled grid: rows are solvers, columns NFE budgets, same seeds "
        "everywhere.",
    )
    c.add_argument("--model", default="builtin")
    c.add_argument(
        "--solvers", default="auto,dpmpp_2m,dpmpp_3m,ddim", help="comma-separated solvers"
    )
    c.add_argument("--nfe", default="5,10,20", help="comma-separated budgets")
    c.add_argument("--guidance", type=float, default=3.0)
    c.add_argument("--num", type=positive_int("--num"), default=10)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.add_argument("--out", default="compare.png")
    c.set_defaults(func=cmd_compare)
