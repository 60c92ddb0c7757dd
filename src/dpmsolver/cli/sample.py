"""The ``dpmsolver`` command-line tool.

Commands: ``sample`` (the built-in digits model or a local diffusers model directory),
``compare`` (the same seeds through several solvers and budgets, one labelled grid),
``solvers`` (the registry), ``bench`` (the error-vs-NFE and sample-quality benchmarks) and
``generate`` (large sharded, resumable runs; see :mod:`dpmsolver.generate`).
Every output file is written atomically; bad options exit with status 2 and a message
naming the option.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import __version__
from .io import atomic_write
from .sampling import SampleResult, sample
from .schedules import DiscreteVPSchedule
from .solvers import ALIASES, REGISTRY, configurations

__all__ = ["main"]


class UsageError(Exception):
    """A bad option value; reported as ``dpmsolver: error: ...`` with exit status 2."""


# ----------------------------------------------------------------------------------------
# shared option parsing
# ----------------------------------------------------------------------------------------


def _int_list(name: str, text: str, *, lo: int, hi: int | None = None) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{name} must not be empty")
    for v in values:
        if v < lo or (hi is not None and v > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise UsageError(f"{name} values must be {bound}, got {v}")
    return values


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available")
    return dev


def _check_solver(name: str, option: str = "--solver") -> None:
    if name != "auto" and name not in REGISTRY and name not in ALIASES:
        choices = ", ".join(["auto", *sorted(REGISTRY), *sorted(ALIASES)])
        raise UsageError(f"{option}: {name!r} is not a solver; choose one of: {choices}")


def _check_output(path: Path, option: str) -> None:
    """Fail before any work if ``path`` cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{option}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{option}: directory {str(parent)!r} is not writable")
    if path.is_dir():
        raise UsageError(f"{option}: {str(path)!r} is a directory")


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------


class LoadedModel:
    """A network with what sampling needs: schedule, prediction, conditioning, shape."""

    def __init__(
        self,
        network: Callable[..., Tensor],
        schedule: DiscreteVPSchedule,
        prediction: str,
        shape: tuple[int, ...],
        *,
        num_classes: int | None,
        null_label: int | None,
        value_range: tuple[float, float] = (-1.0, 1.0),
        name: str = "model",
    ) -> None:
        self.network = network
        self.schedule = schedule
        self.prediction = prediction
        self.shape = shape
        self.num_classes = num_classes
        self.null_label = null_label
        self.value_range = value_range
        self.name = name

    def conditioning(self, labels: Tensor | None, guidance: float) -> dict[str, Any]:
        """``sample`` keyword arguments for these labels and guidance scale."""
        if labels is None or self.num_classes is None:
            if guidance != 1.0:
                raise UsageError("--guidance needs a class-conditional model")
            return {}
        cond = {"y": labels}
        if guidance == 1.0 or self.null_label is None:
            if guidance != 1.0:
                raise UsageError("--guidance needs a model trained with a null label")
            return {"cond": cond}
        return {"cond": cond, "uncond": {"y": torch.full_like(labels, self.null_label)}, "guidance_scale": guidance}


def load_builtin(device: torch.device) -> LoadedModel:
    """The shipped digits model (8x8, 10 classes, eps prediction, SD schedule)."""
    from .digits import DIGITS_SCHEDULE, load_default_model

    net = load_default_model(device=device)
    sched = DiscreteVPSchedule(
        beta_schedule=DIGITS_SCHEDULE["beta_schedule"],
        beta_start=DIGITS_SCHEDULE["beta_start"],
        beta_end=DIGITS_SCHEDULE["beta_end"],
        num_train_timesteps=DIGITS_SCHEDULE["num_train_timesteps"],
    )
    size, ch = DIGITS_SCHEDULE["image_size"], DIGITS_SCHEDULE["channels"]
    return LoadedModel(
        net, sched, DIGITS_SCHEDULE["prediction"], (ch, size, size),
        num_classes=10, null_label=DIGITS_SCHEDULE["null_label"], name="built-in digits",
    )


_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}


def load_diffusers_dir(path: Path, device: torch.device) -> LoadedModel:
    """A local diffusers model directory holding ``unet/`` (``UNet2DModel``, optionally
    class-conditional) and ``scheduler/`` with a DDPM-style beta schedule."""
    if not path.is_dir():
        raise UsageError(f"--model {str(path)!r}: no such directory")
    try:
        import diffusers
    except ImportError:
        raise UsageError("--model DIR needs diffusers: pip install diffusers") from None
    import json

    unet_dir, cfg_file = path / "unet", path / "scheduler" / "scheduler_config.json"
    if not unet_dir.is_dir() or not cfg_file.is_file():
        raise UsageError(f"--model {str(path)!r} must contain unet/ and scheduler/scheduler_config.json")
    cfg = json.loads(cfg_file.read_text())
    unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir)).to(device).eval()
    betas = cfg.get("trained_betas")
    sched = DiscreteVPSchedule(
        betas=torch.tensor(betas, dtype=torch.float64) if betas else None,
        beta_schedule=cfg.get("beta_schedule", "linear"),
        beta_start=cfg.get("beta_start", 0.0001),
        beta_end=cfg.get("beta_end", 0.02),
        num_train_timesteps=cfg.get("num_train_timesteps", 1000),
        rescale_zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
    )
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in _PREDICTIONS:
        raise UsageError(f"--model: prediction_type {pred!r} is not supported ({', '.join(_PREDICTIONS)})")
    num_classes = unet.config.get("num_class_embeds")

    def network(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return unet(x, t, class_labels=y).sample

    c, s = int(unet.config.in_channels), int(unet.config.sample_size)
    return LoadedModel(network, sched, _PREDICTIONS[pred], (c, s, s), num_classes=num_classes, null_label=None, name=str(path))


def load_model(spec: str, device: torch.device) -> LoadedModel:
    """``builtin`` or a diffusers directory."""
    return load_builtin(device) if spec == "builtin" else load_diffusers_dir(Path(spec), device)


# ----------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------


def _labels(args: argparse.Namespace, model: LoadedModel) -> Tensor | None:
    if model.num_classes is None:
        if args.labels is not None:
            raise UsageError("--labels given but the model is not class-conditional")
        return None
    if args.labels is not None:
        labels = _int_list("--labels", args.labels, lo=0, hi=model.num_classes - 1)
    else:
        labels = [c for c in range(model.num_classes) for _ in range(args.per_class)]
    return torch.tensor(labels, dtype=torch.long)


def sample_indices(
    model: LoadedModel,
    indices: Sequence[int],
    labels: Tensor | None,
    *,
    solver: str,
    nfe: int,
    guidance: float,
    seed: int,
    device: torch.device,
    grid: str | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    network: Callable[..., Tensor] | None = None,
) -> SampleResult:
    """Sample the run's samples ``indices`` (with class ``labels``, one per index) as one
    batch. Sample i's initial noise and its stochastic-solver noise (a separate stream)
    come only from ``(seed, i)``, so a sample does not depend on which batch it is in.

    Args:
        dtype: dtype of the initial noise and state (float16/bfloat16 run the network in
            that dtype, see :func:`dpmsolver.sample`).
        network: call this instead of ``model.network`` (e.g. a wrapper that fixes how the
            rows are grouped into network calls).
    """
    from .noise import SeededNoise, sample_seeds, seeded_randn

    seeds = sample_seeds(seed, indices)
    noise = seeded_randn(seeds, model.shape, device=device, dtype=dtype)
    y = labels.to(device) if labels is not None else None
    kwargs = model.conditioning(y, guidance)
    with torch.no_grad():
        return sample(
            network if network is not None else model.network, noise, schedule=model.schedule,
            prediction=model.prediction, solver=solver, nfe=nfe, grid=grid, progress=progress,  # type: ignore[arg-type]
            noise_sampler=SeededNoise(seeds), **kwargs,
        )


def run_sampling(
    model: LoadedModel,
    labels: Tensor | None,
    n: int,
    *,
    solver: str,
    nfe: int,
    guidance: float,
    seed: int,
    batch: int,
    device: torch.device,
    grid: str | None = None,
    progress: bool = False,
) -> tuple[Tensor, int]:
    """Samples in batches; sample i uses noise seeded by ``(seed, i)`` so results do not
    depend on the batch size. Returns (samples on CPU, evaluations spent)."""
    out, spent = [], 0
    for start in range(0, n, batch):
        idx = list(range(start, min(n, start + batch)))
        r = sample_indices(
            model, idx, labels[idx] if labels is not None else None, solver=solver, nfe=nfe,
            guidance=guidance, seed=seed, device=device, grid=grid, progress=progress,
        )
        out.append(r.x.float().cpu())
        spent += r.nfe
    return torch.cat(out), spent


def cmd_sample(args: argparse.Namespace) -> int:
    _check_solver(args.solver)
    if args.guidance < 0 or not np.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    out_png = Path(args.out) if args.out else None
    out_npz = Path(args.npz) if args.npz else None
    if out_png is None and out_npz is None:
        raise UsageError("nothing to write: give --out and/or --npz")
    for p, opt in ((out_png, "--out"), (out_npz, "--npz")):
        if p is not None:
            _check_output(p, opt)
    device = _device(args.device)
    model = load_model(args.model, device)
    labels = _labels(args, model)
    n = len(labels) if labels is not None else args.num
    t0 = time.perf_counter()
    x, spent = run_sampling(
        model, labels, n, solver=args.solver, nfe=args.nfe, guidance=args.guidance, seed=args.seed,
        batch=args.batch, device=device, grid=args.grid, progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - t0
    if not bool(torch.isfinite(x).all()):
        raise RuntimeError("sampling produced NaN/Inf; nothing was written")
    if out_png is not None:
        from .images import grid_from_samples, write_png

        nrow = model.num_classes if (labels is not None and args.labels is None and model.num_classes) else int(np.ceil(np.sqrt(n)))
        order = _column_order(labels, model) if args.labels is None and labels is not None else None
        xs = x[order] if order is not None else x
        write_png(out_png, grid_from_samples(xs, nrow, scale=args.scale, value_range=model.value_range))
    if out_npz is not None:
        arrays = {"samples": x.numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]

        atomic_write(out_npz, write)
    written = ", ".join(str(p) for p in (out_png, out_npz) if p is not None)
    print(f"{n} samples from {model.name} with {args.solver}, guidance {args.guidance:g}: "
          f"{args.nfe} network evaluations per sample ({spent} batched calls) in {elapsed:.1f}s -> {written}")
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
        _check_solver(s, "--solvers")
    nfes = _int_list("--nfe", args.nfe, lo=1)
    out = Path(args.out)
    _check_output(out, "--out")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("compare draws a labelled figure with matplotlib: pip install matplotlib") from None
    device = _device(args.device)
    model = load_model(args.model, device)
    labels = torch.arange(model.num_classes) if model.num_classes else None
    n = len(labels) if labels is not None else args.num
    fig, axes = plt.subplots(len(solvers), len(nfes), figsize=(2.2 * len(nfes), 1.0 + 0.45 * len(solvers) * 2), squeeze=False)
    from .images import grid_from_samples

    for i, s in enumerate(solvers):
        for j, k in enumerate(nfes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            try:
                x, _ = run_sampling(model, labels, n, solver=s, nfe=k, guidance=args.guidance, seed=args.seed, batch=n, device=device)
                img = grid_from_samples(x, min(n, 10), scale=2, value_range=model.value_range)
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
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


# ----------------------------------------------------------------------------------------
# solvers
# ----------------------------------------------------------------------------------------


def cmd_solvers(args: argparse.Namespace) -> int:
    print(f"{'solver':22s} {'order':5s} {'options':28s} {'claimed':8s} description")
    seen: set[str] = set()
    for name, cfg, s in sorted(configurations(), key=lambda c: c[0]):
        info = REGISTRY[name]
        opts = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "order")
        claim = "SDE" if s.stochastic else f"{s.claimed_order:g}"
        desc = info.description if name not in seen else ""
        print(f"{name if name not in seen else '':22s} {cfg.get('order')!s:5s} {opts:28s} {claim:8s} {desc}")
        if args.verbose and name not in seen:
            print(f"{'':66s} {info.reference}")
        seen.add(name)
    print("\naliases: " + ", ".join(f"{a} = {b}{''.join(f' {k}={v}' for k, v in f.items())}" for a, (b, f) in sorted(ALIASES.items())))
    print("auto: the measured recommendation for the budget and guidance (dpmsolver.auto)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.run import run

    out = Path(args.out)
    if not out.is_dir():
        raise UsageError(f"--out: directory {str(out)!r} does not exist")
    return run(args)


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpmsolver", description="Fast, measured diffusion sampling (DPM-Solver++ and family).")
    p.add_argument("--version", action="version", version=f"dpmsolver {__version__}")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1; 0 = PyTorch's default)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample a grid of images", description="Sample from the built-in digits model (default) or a local diffusers model directory.")
    s.add_argument("--model", default="builtin", help="'builtin' (default) or a diffusers model directory with unet/ and scheduler/")
    s.add_argument("--solver", default="auto", help="solver name or alias, or 'auto' (default; see `dpmsolver solvers`)")
    s.add_argument("--nfe", type=_positive_int("--nfe"), default=10, help="network evaluations per sample (default 10)")
    s.add_argument("--grid", default=None, help="time grid (default: the solver's recommendation, else logsnr)")
    s.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3; 1 = none)")
    s.add_argument("--labels", default=None, help="comma-separated class labels (default: every class, --per-class each)")
    s.add_argument("--per-class", type=_positive_int("--per-class"), default=4, help="samples per class when --labels is not given (default 4)")
    s.add_argument("--num", type=_positive_int("--num"), default=16, help="samples for an unconditional model (default 16)")
    s.add_argument("--seed", type=int, default=0, help="seed; sample i's noise depends only on (seed, i) (default 0)")
    s.add_argument("--batch", type=_positive_int("--batch"), default=64, help="batch size (default 64)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    s.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png; '' for none)")
    s.add_argument("--npz", default=None, help="also write samples (and labels) to this .npz")
    s.add_argument("--scale", type=_positive_int("--scale"), default=4, help="pixel upscaling in the PNG (default 4)")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("compare", help="same seeds through several solvers and budgets", description="One labelled grid: rows are solvers, columns NFE budgets, same seeds everywhere.")
    c.add_argument("--model", default="builtin")
    c.add_argument("--solvers", default="auto,dpmpp_2m,dpmpp_3m,ddim", help="comma-separated solvers")
    c.add_argument("--nfe", default="5,10,20", help="comma-separated budgets")
    c.add_argument("--guidance", type=float, default=3.0)
    c.add_argument("--num", type=_positive_int("--num"), default=10)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.add_argument("--out", default="compare.png")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="error-vs-NFE and sample-quality benchmarks", description="Error against exact solutions by NFE and guidance (ours and peers side by side), sample quality on the built-in model, thresholding study; CSV + markdown + plots.")
    from .bench.run import add_arguments

    add_arguments(b)
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("solvers", help="list the registered solvers")
    v.add_argument("--verbose", action="store_true", help="also print each solver's paper reference")
    v.set_defaults(func=cmd_solvers)

    from .generate import add_parser as add_generate  # imports this module, hence here

    add_generate(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dpmsolver`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.exit(2, f"dpmsolver: error: --threads must be >= 0, got {args.threads}\n")
    if args.threads:
        # For small models extra intra-op threads mostly wait on each other, badly so on a
        # busy machine; 0 keeps PyTorch's default.
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args))
    except UsageError as e:
        parser.exit(2, f"dpmsolver: error: {e}\n")
    except ValueError as e:  # library validation errors name the parameter already
        parser.exit(2, f"dpmsolver: error: {e}\n")
    return 1


if __name__ == "__main__":
    # `python -m dpmsolver.cli` (and torchrun -m) runs this file as __main__, a second copy
    # of the module: dispatch to the package's copy so the UsageError that other modules
    # import from dpmsolver.cli is the class main() catches.
    from dpmsolver.cli import main as _main

    raise SystemExit(_main())
