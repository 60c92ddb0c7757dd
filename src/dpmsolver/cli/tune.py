"""``dpmsolver tune``: fit ``solver="auto"`` to a model on pilot noises
(:func:`dpmsolver.tune`) and write the profile that ``sample``/``generate --profile`` use."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from ..model import evaluations
from ..models import load_model
from ..tune import DEFAULT_BUDGETS, Profile, ProfileMismatchError, tune
from .options import (
    DEFAULT_NFE,
    Budget,
    UsageError,
    add_model,
    check_output,
    device,
    float_list,
    int_list,
    positive_int,
    resolve_guidance,
)

__all__ = ["OPTIONS", "add_parser", "cmd_tune", "load_profile"]

#: Extra :class:`dpmsolver.tune.TuneOptions` for every run (tests make tuning cheap here).
OPTIONS: dict[str, Any] = {}


def load_profile(path: str, option: str = "--profile") -> Profile:
    """``--profile FILE`` read (one-line errors naming the option)."""
    try:
        return Profile.load(path)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def cmd_tune(args: argparse.Namespace) -> int:
    """``dpmsolver tune``."""
    budgets = int_list("--nfe", args.nfe, lo=1) if args.nfe else list(DEFAULT_BUDGETS)
    scales = float_list("--guidance", args.guidance) if args.guidance else None
    out = Path(args.out)
    check_output(out, "--out")
    dev = device(args.device)
    model = load_model(args.model, dev, null_label=args.null_label)
    guidance = (
        [resolve_guidance(model, w) for w in scales] if scales else [resolve_guidance(model, None)]
    )
    noise = torch.randn(
        args.pilot, *model.shape, generator=torch.Generator().manual_seed(args.seed)
    ).to(dev)
    labels = None
    if model.num_classes is not None:
        labels = (torch.arange(args.pilot) % model.num_classes).to(dev)
    kwargs: dict[str, Any] = {}
    if labels is not None:
        kwargs["cond"] = {"y": labels}
        if model.null_label is not None:
            kwargs["uncond"] = {"y": torch.full_like(labels, model.null_label)}
    options = dict(OPTIONS)
    if args.shift_runs is not None:
        options["shift_runs"] = args.shift_runs
    if args.compensation_runs is not None:
        options["compensation_runs"] = args.compensation_runs
    if args.correction_components is not None:
        options["correction_components"] = args.correction_components
    if args.denoise_final:
        options["extrapolate_final"] = False
    if args.micro_batch is not None:
        options["micro_batch"] = args.micro_batch
    if args.memo_mb is not None:
        options["memo_mb"] = args.memo_mb
    t0 = time.perf_counter()
    with torch.no_grad():
        profile = tune(
            model.network,
            noise,
            schedule=model.schedule,
            prediction=model.prediction,
            guidance_scale=guidance,
            nfe=budgets,
            progress=not args.no_progress,
            **kwargs,
            **options,
        )
    profile.save(out)
    for c in profile.choices:
        gain = c.default_heldout_error / c.heldout_error if c.heldout_error > 0 else math.inf
        r = c.recipe
        what = r.describe() if r.timesteps is None else f"{r.solver} on fitted knots"
        if r.model_shifts is not None and r.timesteps is not None:
            what += " with model-time shifts"
        print(
            f"guidance {c.guidance_scale:g}, {c.nfe} NFE: {what} ({c.stage}); held-out error "
            f"{c.heldout_error:.3g}, {gain:.2f}x better than the default"
        )
    print(
        f"profile of {model.name} for {len(budgets)} budgets x {len(guidance)} guidance "
        f"scales on {args.pilot} pilot noises: {profile.evaluations} network evaluations "
        f"(sample rows) in {time.perf_counter() - t0:.1f}s -> {out}"
    )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``dpmsolver tune`` on the CLI's subparsers."""
    t = sub.add_parser(
        "tune",
        help="fit solver, grid and time steps to a model (a profile for --profile)",
        description=textwrap.fill(
            "Fit solver='auto' to the model on pilot noises: the exact ODE solution is the "
            "reference, half the pilot calibrates and half is held out, and every choice "
            "(solver and grid, then time steps, then the network's time at each step, then up "
            "to 25 evaluations the compensation of the data predictions) is kept "
            "only if the held-out half improves. "
            "Writes a profile that `dpmsolver sample --profile` and `dpmsolver generate "
            "--profile` use. Costs minutes: 9.7 (guidance 3, stop 42) on 2 CPU cores for "
            "the built-in model, 8 budgets and 128 pilot noises; the machines here differ up to "
            "2x in speed (benchmarks/tune_cost.md). "
            "Runs on every core unless given --threads N: the reference on N intra-op "
            "threads, then every budget side by side, their network calls merged in N lanes "
            "of one thread each (N >= 2; one budget at a time for N = 1). "
            "A network that cannot take 1024 rows in one call needs --micro-batch."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(t)
    t.add_argument(
        "--guidance",
        default=None,
        help="comma-separated classifier-free guidance scales to tune (default 3 for a model "
        "with a null label, else 1)",
    )
    t.add_argument(
        "--nfe",
        default=None,
        help="comma-separated budgets to tune (default "
        + ",".join(str(n) for n in DEFAULT_BUDGETS)
        + ")",
    )
    t.add_argument(
        "--pilot",
        type=positive_int("--pilot", minimum=4),
        default=128,
        help="pilot noises (default 128; half calibrate, half are held out)",
    )
    t.add_argument(
        "--shift-runs",
        type=positive_int("--shift-runs", minimum=0),
        default=None,
        help="sampler runs that fit the network's time at each knot, per budget (default 60; "
        "0 skips it, for a profile the k-diffusion functions read as sigmas)",
    )
    t.add_argument(
        "--compensation-runs",
        type=positive_int("--compensation-runs", minimum=0),
        default=None,
        help="sampler runs that fit the data prediction's compensation, per budget up to 25 "
        "(default 40; 0 skips it, for a profile the k-diffusion functions read as sigmas)",
    )
    t.add_argument(
        "--correction-components",
        type=positive_int("--correction-components", minimum=0),
        default=None,
        help="coordinates per step of the data prediction's correction in the trajectory's "
        "principal directions (stage (g), PAS), fitted per budget up to 10 (default 4; 0 "
        "skips it, for a profile the k-diffusion functions read as sigmas)",
    )
    t.add_argument(
        "--denoise-final",
        action="store_true",
        help="end every budget with the denoising step (no extrapolated step into sigma = 0, "
        "stage (e)), for a profile the k-diffusion functions read as sigmas",
    )
    t.add_argument(
        "--micro-batch",
        type=positive_int("--micro-batch"),
        default=None,
        help="at most this many samples per network call (default: a stage's whole batch, up "
        "to the 512 rows of the blow-up guard); set it when those do not fit in memory",
    )
    t.add_argument(
        "--memo-mb",
        type=positive_int("--memo-mb", minimum=0),
        default=None,
        help="MiB per budget for answering a network call that repeats one made before "
        "(default 256; 0 sends every call to the network; the choices are the same either way)",
    )
    t.add_argument("--out", default="profile.json", help="profile to write (default profile.json)")
    t.add_argument("--seed", type=int, default=0, help="seed of the pilot noises (default 0)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(func=cmd_tune, default_threads=0)


def add_profile_option(p: argparse.ArgumentParser) -> None:
    """``--profile FILE`` for ``sample`` and ``generate``."""
    p.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="a profile from `dpmsolver tune` for this model: solver auto with the fitted "
        "solver, grid and time steps of the budget and guidance scale (a budget the profile "
        "lacks falls back to the default auto recipe with a warning)",
    )


def resolve_profile(
    args: argparse.Namespace, model: Any, guidance: float
) -> tuple[Profile | None, Any]:
    """``--profile``: the profile and the :class:`~.options.Budget` it gives, or
    ``(None, None)`` without one or when it lacks this budget and guidance scale (a
    one-line warning on stderr; the default ``auto`` recipe runs). A profile of another
    schedule or prediction, or a file that is not a current profile, is a one-line error."""
    if getattr(args, "profile", None) is None:
        return None, None
    if getattr(args, "ems", None) is not None:
        raise UsageError(
            "--profile and --ems: a profile picks its own solver, --ems runs dpmv3; give one"
        )
    if args.solver != "auto":
        raise UsageError(
            f"--profile holds recipes for --solver auto, not --solver {args.solver}; drop one"
        )
    if args.grid is not None:
        raise UsageError("--grid: a profile fixes the grid; drop --grid or --profile")
    profile = load_profile(args.profile)
    try:
        profile.check(model.schedule, model.prediction)
    except ProfileMismatchError as e:
        raise UsageError(f"--profile {args.profile}: {e}") from None
    nfe = DEFAULT_NFE if args.nfe is None else args.nfe
    choice = profile.choice(nfe, guidance)
    if choice is None:
        held = ", ".join(f"{c.nfe} NFE at guidance {c.guidance_scale:g}" for c in profile.choices)
        print(
            f"dpmsolver: warning: --profile {args.profile} has no choice for {nfe} NFE at "
            f"guidance {guidance:g} (it holds {held}); using the default auto recipe",
            file=sys.stderr,
        )
        return None, None
    recipe = choice.recipe
    spent = evaluations(model, recipe, nfe=None if recipe.timesteps else nfe)
    return profile, Budget("auto", nfe=nfe, evaluations=spent, note="tuned profile")
