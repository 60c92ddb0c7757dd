"""``dpmsolver ems``: a model's empirical statistics for DPM-Solver-v3, written to a file
that ``dpmsolver sample --ems FILE`` (and ``compare``) sample with.

The statistics are taken over the model's own probability-flow trajectories at the given
guidance scale, from the same seeded noise a sampling run uses
(:func:`dpmsolver.ems.estimate_model_ems`): with guidance only those states are distributed
like the ones a sampler meets (``benchmarks/v3_study.md``, (b)).

Defaults (``--samples``, ``--points``): :data:`dpmsolver.ems.MODEL_EMS_SAMPLES` and
:data:`~dpmsolver.ems.MODEL_EMS_POINTS`.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from ..ems import MODEL_EMS_POINTS, MODEL_EMS_SAMPLES, CheckpointError, estimate_model_ems
from ..models import load_model
from .options import (
    UsageError,
    add_guidance,
    add_model,
    check_guidance,
    check_output,
    device,
    positive_int,
    resolve_guidance,
)

__all__ = ["add_parser", "cmd_ems", "default_checkpoint"]

JVP_CHOICES = ("vjp", "forward", "double_backward")


def _jvp(text: str) -> str:
    """An argparse ``type`` for ``--jvp``."""
    if text not in JVP_CHOICES:
        raise argparse.ArgumentTypeError(
            f"--jvp: {text!r} is not a method; choose one of: {', '.join(JVP_CHOICES)}"
        )
    return text


def default_checkpoint(out: Path) -> Path:
    """Where partial results go when ``--checkpoint`` is not given: ``<out>.partial``."""
    return out.with_name(out.name + ".partial")


def _interrupted(args: argparse.Namespace) -> str:
    ckpt = args.checkpoint or default_checkpoint(Path(args.out))
    return f"; finished grid points are kept in {ckpt}: run the same command again to resume"


def cmd_ems(args: argparse.Namespace) -> int:
    """``dpmsolver ems``."""
    check_guidance(args.guidance)
    batch = min(args.batch, args.samples)
    if args.samples % batch:
        raise UsageError(
            f"--samples {args.samples} must be a multiple of --batch {batch} (every network "
            "call takes a whole batch, labels cycling over the classes)"
        )
    out = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint(out)
    check_output(out, "--out")
    check_output(ckpt, "--checkpoint")
    if ckpt.absolute() == out.absolute():
        raise UsageError(f"--checkpoint must not be the --out file ({out})")
    dev = device(args.device)
    model = load_model(args.model, dev, null_label=args.null_label)
    guidance = resolve_guidance(model, args.guidance)
    resumed = ckpt.exists()
    calls = [0]

    def network(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        calls[0] += 1
        return model.network(x, t, **kwargs)

    t0 = time.perf_counter()
    try:
        ems = estimate_model_ems(
            model,
            guidance=guidance,
            samples=args.samples,
            points=args.points,
            batch_size=batch,
            probes=args.probes,
            seed=args.seed,
            jvp=args.jvp,
            checkpoint=ckpt,
            device=dev,
            network=network,
            progress=not args.no_progress,
        )
    except CheckpointError as e:
        raise UsageError(f"--checkpoint: {e}") from None
    elapsed = time.perf_counter() - t0
    ems.save(out)
    ckpt.unlink(missing_ok=True)  # everything it held is in the statistics now
    note = f", resumed from {ckpt}" if resumed else ""
    print(
        f"EMS of {model.name} at guidance {guidance:g}: {args.samples} samples x "
        f"{args.points} grid points, {calls[0]} network calls in {elapsed:.1f}s{note} -> {out}"
    )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``dpmsolver ems`` on the CLI's subparsers."""
    e = sub.add_parser(
        "ems",
        help="estimate empirical model statistics for DPM-Solver-v3 (sample --ems FILE)",
        description=textwrap.fill(
            "Estimate the model's empirical statistics (DPM-Solver-v3, Zheng et al. 2023) over "
            "its own sampling trajectories at one guidance scale, and write them to a "
            "safetensors file for `dpmsolver sample --ems FILE`. An interrupted run keeps "
            "its finished grid points in --checkpoint and resumes there when run again."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(e)
    add_guidance(e)
    e.add_argument(
        "--out",
        default="ems.safetensors",
        help="statistics file to write (default ems.safetensors)",
    )
    e.add_argument(
        "--samples",
        type=positive_int("--samples"),
        default=MODEL_EMS_SAMPLES,
        help=f"trajectories averaged over (default {MODEL_EMS_SAMPLES})",
    )
    e.add_argument(
        "--points",
        type=positive_int("--points", minimum=4),
        default=MODEL_EMS_POINTS,
        help=f"grid points, uniform in log-SNR (default {MODEL_EMS_POINTS})",
    )
    e.add_argument(
        "--batch",
        type=positive_int("--batch"),
        default=64,
        help="samples per network call (default 64); --samples must be a multiple of it",
    )
    e.add_argument(
        "--probes",
        type=positive_int("--probes"),
        default=1,
        help="random probes per sample for the Jacobian diagonal (default 1)",
    )
    e.add_argument(
        "--seed",
        type=positive_int("--seed", minimum=0),
        default=0,
        help="seed; trajectory i starts from sample i's noise of `sample --seed` (default 0)",
    )
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    e.add_argument(
        "--jvp",
        type=_jvp,
        default="vjp",
        help="how probes meet the Jacobian: vjp (default; one backward pass), forward "
        "(forward-mode AD, about 2x slower) or double_backward",
    )
    e.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="partial results, for resuming (default <out>.partial; removed after success)",
    )
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(func=cmd_ems, interrupted=_interrupted)
