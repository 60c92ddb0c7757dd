"""``dpmsolver generate``: large sharded, resumable, multi-process generation
(:func:`dpmsolver.generate.generate`)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Literal

import torch

from ..generate import GenerationError, files_sha256, generate, model_fingerprint, sha256_file
from ..model import LoadedModel
from ..models import BUILTIN, load_model
from .options import (
    UsageError,
    add_budget_options,
    add_ems,
    add_guidance,
    add_model,
    check_budget_options,
    check_ems,
    check_guidance,
    check_output_dir,
    describe,
    device,
    ems_option,
    int_list,
    positive_int,
    resolve_budget,
    resolve_guidance,
    solver_help,
)
from .tune import add_profile_option, resolve_profile

__all__ = ["add_parser", "cmd_generate", "model_identity"]


def model_identity(spec: str, model: LoadedModel) -> dict[str, Any]:
    """What identifies the model named by ``--model`` in the run's configuration: the
    sha256 of the built-in model's weight file, of a model directory's files, or of a
    factory's network (:func:`~dpmsolver.generate.model_fingerprint`)."""
    if spec in BUILTIN:
        from ..digits import load as digits

        name = {"builtin-flow": digits.FLOW_FILE, "builtin-edm": digits.EDM_FILE}
        weights = digits.WEIGHTS_DIR / name.get(spec, digits.DENOISER_FILE)
        return {"builtin": weights.name, "sha256": sha256_file(weights)}
    path = Path(spec)
    if path.is_dir():
        files = [f for sub in ("unet", "scheduler") for f in (path / sub).rglob("*") if f.is_file()]
        return {"directory": str(path.resolve()), "sha256": files_sha256(files, path)}
    try:
        ident = model_fingerprint(model.network)
    except ValueError as e:
        raise UsageError(f"--model {spec!r}: {e}") from None
    return {"factory": spec, **ident}


def _rank_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device without an index means this process's GPU: local rank
    modulo the GPUs (more processes than GPUs share them, round robin)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return device


def _interrupted(args: argparse.Namespace) -> str:
    return f"; the finished shards in {args.out} are kept: run the same command again to resume"


def cmd_generate(args: argparse.Namespace) -> int:
    """``dpmsolver generate``."""
    ems = ems_option(args)  # first: with --ems, --solver auto means dpmv3
    check_budget_options(args, adaptive_ok=False)
    check_guidance(args.guidance)
    out = Path(args.out)
    check_output_dir(out, "--out")
    dev = _rank_device(device(args.device))
    model = load_model(args.model, dev, null_label=args.null_label)
    guidance = resolve_guidance(model, args.guidance)
    profile, tuned = resolve_profile(args, model, guidance)
    if ems is not None:
        check_ems(ems, args.ems, model, guidance)
    budget = tuned or resolve_budget(model, args)
    model_id = model_identity(args.model, model)
    if args.labels == "cycle":
        labels: Literal["cycle"] | list[int] = "cycle"
    elif model.num_classes is None:
        raise UsageError("--labels given but the model is not class-conditional")
    else:
        labels = int_list("--labels", args.labels, lo=0, hi=model.num_classes - 1)
    t0 = time.perf_counter()
    try:
        manifest = generate(
            model,
            args.num,
            out,
            seed=args.seed,
            solver=args.solver,
            nfe=budget.nfe,
            steps=budget.steps,
            guidance=guidance,
            labels=labels,
            grid=args.grid,
            batch_size=args.batch,
            micro_batch=args.micro_batch,
            shard_size=args.shard_size,
            on_nonfinite=args.on_nonfinite,
            device=dev,
            model_id=model_id,
            progress=not args.no_progress,
            ems=ems,
            profile=profile,
        )
    except GenerationError as e:
        print(f"dpmsolver: error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        elapsed = time.perf_counter() - t0
        failed = len(manifest.failed)
        note = (
            f"; {failed} samples went non-finite and were skipped (listed in the manifest)"
            if failed
            else ""
        )
        if budget.note:
            note += f"; {budget.note}"
        if ems is not None:
            note += f"; statistics {args.ems}"
        print(
            f"{manifest.samples} of {args.num} samples from {model.name} in {out} "
            f"({len(manifest.shards)} shards, {describe(budget, args)}, guidance {guidance:g}, "
            f"{elapsed:.1f}s){note}"
        )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``dpmsolver generate`` on the CLI's subparsers."""
    g = sub.add_parser(
        "generate",
        help="large sharded, resumable, multi-process generation",
        description=textwrap.fill(
            "Generate NUM samples into DIR as checksummed shards with a manifest. "
            "Re-running the same command resumes (after Ctrl-C or a crash); a different "
            "configuration is refused. "
            "Multi-process: torchrun --nproc_per_node K -m dpmsolver.cli generate ..."
        ),
        epilog=solver_help(adaptive=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # --num-samples first: torchrun's own parser takes a bare --num for its --numa-binding.
    g.add_argument(
        "--num-samples",
        "--num",
        dest="num",
        metavar="N",
        type=positive_int("--num"),
        required=True,
        help="number of samples (write --num-samples under torchrun)",
    )
    g.add_argument(
        "--out", metavar="DIR", required=True, help="output directory (created if missing)"
    )
    add_model(g)
    g.add_argument(
        "--solver",
        default="auto",
        help="solver name or alias, or 'auto' (default); not adaptive solvers; listed below",
    )
    add_budget_options(g, adaptive=False)
    add_guidance(g)
    add_ems(g)
    g.add_argument(
        "--labels",
        default="cycle",
        help="'cycle' (default: sample i has class i mod num_classes) or comma-separated classes "
        "cycled the same way",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed; sample i depends only on (seed, i) (default 0)"
    )
    g.add_argument(
        "--batch",
        type=positive_int("--batch"),
        default=64,
        help="samples integrated together (default 64); does not change the output",
    )
    g.add_argument(
        "--micro-batch",
        type=positive_int("--micro-batch"),
        default=32,
        help="samples per network call (default 32); part of the configuration",
    )
    g.add_argument(
        "--shard-size",
        type=positive_int("--shard-size"),
        default=1000,
        help="samples per shard file (default 1000)",
    )
    g.add_argument(
        "--on-nonfinite",
        choices=("stop", "skip"),
        default="stop",
        help="NaN/Inf samples: stop with an error (default) or skip and record them",
    )
    g.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N or auto (default); under torchrun cuda means cuda:LOCAL_RANK "
        "modulo the GPUs",
    )
    add_profile_option(g)
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.set_defaults(func=cmd_generate, interrupted=_interrupted)
