"""Option parsing shared by the commands: every bad value becomes one line on stderr
naming the option and exit status 2, whether argparse finds it (:class:`Parser`) or a
command does (a :class:`UsageError`, reported by :func:`dpmsolver.cli.main`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch

from ..ems import EMS
from ..io import check_writable_dir, check_writable_file
from ..model import LoadedModel, evaluations, resolve_device
from ..recipe import POLICIES, Recipe
from ..solvers import ALIASES, REGISTRY, AdaptiveSolver, get_solver
from ..solvers.adaptive import AdaptiveDPMSolver
from ..solvers.v3 import recommended_options
from ..timegrid import GRID_KINDS

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_NFE",
    "Budget",
    "Parser",
    "UsageError",
    "adaptive_solvers",
    "add_budget_options",
    "add_ems",
    "add_guidance",
    "add_model",
    "add_null_label",
    "add_threads",
    "budget_problem",
    "check_budget_options",
    "check_ems",
    "check_guidance",
    "check_output",
    "check_output_dir",
    "check_solver",
    "describe",
    "device",
    "ems_budget",
    "ems_option",
    "ems_recipe",
    "float_list",
    "int_list",
    "is_adaptive",
    "load_ems",
    "positive_int",
    "resolve_budget",
    "resolve_guidance",
    "solver_help",
    "thread_count",
]

#: The budget when neither ``--nfe`` nor ``--steps`` is given.
DEFAULT_NFE = 10
#: The guidance scale when ``--guidance`` is not given, for models with a null label.
DEFAULT_GUIDANCE = 3.0


class UsageError(ValueError):
    """A bad option value; reported as ``dpmsolver: error: ...`` with exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        # "argument --nfe: --nfe must be >= 1" names the option twice.
        head, sep, rest = message.partition(": ")
        if head.startswith("argument ") and sep and rest.startswith("-"):
            message = rest
        self.exit(2, f"dpmsolver: error: {message} (see `{self.prog} --help`)\n")


# ----------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------


T = TypeVar("T")


def _comma_separated(name: str, text: str, convert: Callable[[str], T], what: str) -> list[T]:
    """The non-empty comma-separated values of ``text`` converted; errors name ``name``."""
    try:
        values = [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name} must be comma-separated {what}, got {text!r}") from None
    if not values:
        raise UsageError(f"{name} must not be empty")
    return values


def float_list(name: str, text: str) -> list[float]:
    """Comma-separated finite numbers >= 0."""
    values = _comma_separated(name, text, float, "numbers")
    for v in values:
        if not math.isfinite(v) or v < 0:
            raise UsageError(f"{name} values must be finite numbers >= 0, got {v:g}")
    return values


def int_list(name: str, text: str, *, lo: int, hi: int | None = None) -> list[int]:
    """Comma-separated integers in ``[lo, hi]``."""
    values = _comma_separated(name, text, int, "integers")
    for v in values:
        if v < lo or (hi is not None and v > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise UsageError(f"{name} values must be {bound}, got {v}")
    return values


def positive_int(name: str, minimum: int = 1) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``minimum`` (default 1)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {v}")
        return v

    return parse


def positive_float(name: str) -> Callable[[str], float]:
    """An argparse ``type`` for finite numbers > 0."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text}")
        return v

    return parse


def grid_kind(text: str) -> str:
    """An argparse ``type`` for ``--grid``."""
    if text not in GRID_KINDS:
        raise argparse.ArgumentTypeError(
            f"--grid: {text!r} is not a grid; choose one of: {', '.join(GRID_KINDS)}"
        )
    return text


def device(text: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:N or auto."""
    try:
        return resolve_device(text, "--device")
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_output(path: Path, option: str) -> None:
    """Fail before any work if the file ``path`` cannot be written."""
    try:
        check_writable_file(path, option)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_output_dir(path: Path, option: str, *, create: bool = False) -> None:
    """Fail before any work if the directory ``path`` cannot be written in (or made)."""
    try:
        check_writable_dir(path, option, create=create)
    except ValueError as e:
        raise UsageError(str(e)) from None


def add_threads(p: argparse.ArgumentParser, *, top: bool) -> None:
    """``--threads``, before the command (``top``) or after it: the later one wins."""
    p.add_argument(
        "--threads",
        type=positive_int("--threads", minimum=0),
        # A command's own default must not overwrite the value given before the command;
        # None (not given) resolves through thread_count.
        default=None if top else argparse.SUPPRESS,
        help="CPU intra-op threads (default 1, `tune` 0; 0 = PyTorch's default: every core)",
    )


def thread_count(args: argparse.Namespace) -> int:
    """The ``--threads`` value, or the command's default where it was not given: 1 (small
    batches: extra intra-op threads mostly wait on each other), except where the command
    sets ``default_threads`` (``tune`` evaluates its whole pilot at once: 0, every core;
    measured 13.5 min on one thread against 10.9 on two, with the reference's earlier
    starting tolerance; benchmarks/tune_cost.md)."""
    if args.threads is not None:
        return int(args.threads)
    return int(getattr(args, "default_threads", 1))


# ----------------------------------------------------------------------------------------
# solvers and budgets
# ----------------------------------------------------------------------------------------


def check_solver(name: str, option: str = "--solver") -> None:
    """A policy (``auto``), registry name or alias."""
    if name not in POLICIES and name not in REGISTRY and name not in ALIASES:
        choices = ", ".join([*POLICIES, *sorted(REGISTRY), *sorted(ALIASES)])
        raise UsageError(f"{option}: {name!r} is not a solver; choose one of: {choices}")


def adaptive_solvers() -> list[str]:
    """The registered adaptive solvers (they choose their own steps)."""
    return sorted(n for n, info in REGISTRY.items() if issubclass(info.cls, AdaptiveSolver))


def is_adaptive(name: str) -> bool:
    """Whether the (valid) solver name is an adaptive solver."""
    return name not in POLICIES and isinstance(get_solver(name), AdaptiveSolver)


def solver_help(*, adaptive: bool = True) -> str:
    """The solvers and grids, briefly, for a command's ``--help``."""
    fixed = [n for n in sorted(REGISTRY) if n not in adaptive_solvers()]
    parts = [
        f"solvers (--solver): {', '.join(POLICIES)} (default: the measured recommendation for "
        "the budget and guidance); fixed steps: " + ", ".join(fixed) + "; aliases: "
        f"{', '.join(sorted(ALIASES))}"
        + (
            f"; adaptive (--rtol/--atol, no --nfe/--steps): {', '.join(adaptive_solvers())}"
            if adaptive
            else ""
        )
        + ". `dpmsolver solvers` describes each.",
        f"grids (--grid): {', '.join(GRID_KINDS)}.",
    ]
    return "\n".join(textwrap.fill(p, 88) for p in parts)


def add_model(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--null-label``."""
    p.add_argument(
        "--model",
        default="builtin",
        help="'builtin' (default: the digits U-Net), 'builtin-flow' (rectified-flow "
        "transformer), 'builtin-edm' (EDM U-Net), a diffusers model directory with unet/ and "
        "scheduler/, or module:function returning a LoadedModel",
    )
    add_null_label(p)


def add_null_label(p: argparse.ArgumentParser) -> None:
    """``--null-label`` (for a model directory)."""
    p.add_argument(
        "--null-label",
        type=positive_int("--null-label", minimum=0),
        default=None,
        metavar="N",
        help="for --model DIR: the class embedding the model was trained with for 'no class' "
        "(its last one), which classifier-free guidance needs",
    )


def add_guidance(p: argparse.ArgumentParser) -> None:
    """``--guidance`` (its default depends on the model: :func:`resolve_guidance`)."""
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE:g} for a model with a "
        "null label, else 1 = none)",
    )


def add_budget_options(p: argparse.ArgumentParser, *, adaptive: bool) -> None:
    """``--nfe`` / ``--steps`` (one of them), ``--grid`` and, where adaptive solvers are
    allowed, ``--rtol`` / ``--atol``."""
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--nfe",
        type=positive_int("--nfe"),
        default=None,
        help=f"network evaluations per sample (default {DEFAULT_NFE}; a solver whose steps "
        f"cannot add up to exactly {DEFAULT_NFE} takes the largest budget below it that they "
        "can; an explicit --nfe is never changed)",
    )
    budget.add_argument(
        "--steps",
        type=positive_int("--steps"),
        default=None,
        help="grid steps instead of an --nfe budget (fixed-step solvers; not with auto)",
    )
    p.add_argument(
        "--grid",
        type=grid_kind,
        default=None,
        metavar="GRID",
        help="time grid (default: the solver's recommendation, else logsnr): "
        + ", ".join(GRID_KINDS),
    )
    if adaptive:
        for name, kind in (("rtol", "relative"), ("atol", "absolute")):
            p.add_argument(
                f"--{name}",
                type=positive_float(f"--{name}"),
                default=None,
                help=f"adaptive solvers only: {kind} error tolerance "
                f"(default {getattr(AdaptiveDPMSolver, name):g})",
            )


def check_budget_options(args: argparse.Namespace, *, adaptive_ok: bool = True) -> None:
    """Before any work: the solver exists, and the budget options fit its kind."""
    name = args.solver
    check_solver(name)
    adaptive = is_adaptive(name)
    tolerances = [opt for opt in ("rtol", "atol") if getattr(args, opt, None) is not None]
    if adaptive and not adaptive_ok:
        raise UsageError(
            f"--solver {name} is adaptive: its step sizes come from the whole batch's error, "
            "so a sample would depend on its batch; choose a fixed-step solver or auto"
        )
    if adaptive:
        for opt in ("nfe", "steps", "grid"):
            if getattr(args, opt) is not None:
                raise UsageError(
                    f"--{opt}: --solver {name} is adaptive and chooses its own steps; "
                    "control it with --rtol/--atol"
                )
    elif tolerances:
        raise UsageError(
            f"--{tolerances[0]} applies to adaptive solvers only "
            f"({', '.join(adaptive_solvers())}); --solver {name} takes --nfe or --steps"
        )
    if name in POLICIES and args.steps is not None:
        raise UsageError(
            f"--steps: --solver {name} chooses its steps for an evaluation budget; give --nfe, "
            "or name a solver"
        )


@dataclass(frozen=True)
class Budget:
    """How a command samples: the solver argument and budget for
    :func:`dpmsolver.model.sample_batches` and the evaluations one sample costs.

    Attributes:
        solver: a name, or a :class:`~dpmsolver.recipe.Recipe` carrying tolerances.
        nfe, steps: the budget (both None for an adaptive solver).
        evaluations: network evaluations per sample (None for an adaptive solver).
        note: what the user should know about it (empty if nothing).
    """

    solver: str | Recipe
    nfe: int | None = None
    steps: int | None = None
    evaluations: int | None = None
    note: str = ""


def _cost(model: LoadedModel, solver: str, nfe: int, grid: str | None) -> int | None:
    try:
        return evaluations(model, solver, nfe=nfe, grid=grid)
    except ValueError:
        return None


def budget_problem(
    model: LoadedModel, solver: str, nfe: int, grid: str | None
) -> tuple[str | None, int | None]:
    """``(None, evaluations)`` if ``solver`` can spend ``nfe``, else ``(why, the largest
    budget below nfe it can spend or None)``; ``why`` names the budgets nearby that work."""
    try:
        return None, evaluations(model, solver, nfe=nfe, grid=grid)
    except ValueError as e:
        error = str(e)
    below = next(
        (k for k in range(nfe - 1, 0, -1) if _cost(model, solver, k, grid) is not None), None
    )
    above = next(
        (k for k in range(nfe + 1, 2 * nfe + 8) if _cost(model, solver, k, grid) is not None),
        None,
    )
    if below is None and above is None:
        return error, None
    budgets = " or ".join(str(k) for k in (below, above) if k is not None)
    return (
        f"{solver} cannot spend exactly {nfe} network evaluations per sample (its steps "
        f"cost a fixed number each); budgets nearby that it can spend: {budgets}",
        below,
    )


def resolve_budget(model: LoadedModel, args: argparse.Namespace) -> Budget:
    """The budget the options ask for on this model (after :func:`check_budget_options`).

    An explicit ``--nfe`` that the solver cannot spend exactly is an error naming the
    budgets nearby that work; the default budget becomes the largest one below it that
    the solver can spend (noted)."""
    name = args.solver
    if is_adaptive(name):
        tol = {k: getattr(args, k) for k in ("rtol", "atol") if getattr(args, k, None) is not None}
        return Budget(Recipe(name, tol) if tol else name)
    if args.steps is not None:
        try:
            spent = evaluations(model, name, steps=args.steps, grid=args.grid)
        except ValueError as e:
            raise UsageError(f"--steps {args.steps}: {e}") from None
        return Budget(name, steps=args.steps, evaluations=spent)
    nfe = DEFAULT_NFE if args.nfe is None else args.nfe
    why, cost = budget_problem(model, name, nfe, args.grid)
    if why is None:
        return Budget(name, nfe=nfe, evaluations=cost)
    if args.nfe is None and cost is not None:
        note = f"{name} cannot spend the default {nfe} evaluations exactly; it spends {cost}"
        return Budget(name, nfe=cost, evaluations=cost, note=note)
    raise UsageError(f"--nfe {nfe}: {why}; or give --steps N")


def check_guidance(guidance: float | None) -> None:
    """Before any work: ``--guidance`` is a finite number >= 0 (or not given)."""
    if guidance is not None and (guidance < 0 or not math.isfinite(guidance)):
        raise UsageError(f"--guidance must be a finite number >= 0, got {guidance}")


def resolve_guidance(model: LoadedModel, guidance: float | None) -> float:
    """``--guidance``: default 3 for a model with a null label, else 1 (none); a scale
    other than 1 needs a class-conditional model with a null label."""
    if guidance is None:
        has_null = model.num_classes is not None and model.null_label is not None
        return DEFAULT_GUIDANCE if has_null else 1.0
    check_guidance(guidance)
    if guidance != 1.0 and model.num_classes is None:
        raise UsageError(
            f"--guidance {guidance:g}: {model.name} is not class-conditional, so it has no "
            "classifier-free guidance; use --guidance 1"
        )
    if guidance != 1.0 and model.null_label is None:
        raise UsageError(
            f"--guidance {guidance:g}: {model.name} has no null label (the label meaning 'no "
            "class') for classifier-free guidance; give --null-label N for a model directory "
            "trained with one, or --guidance 1"
        )
    return guidance


def describe(budget: Budget, args: Any) -> str:
    """The budget in a summary line."""
    if budget.evaluations is None:
        tol = ", ".join(
            f"{k} {getattr(args, k):g}" for k in ("rtol", "atol") if getattr(args, k, None)
        )
        return f"adaptive steps{f' ({tol})' if tol else ''}"
    steps = f" on {budget.steps} steps" if budget.steps is not None else ""
    return f"{budget.evaluations} network evaluations per sample{steps}"


# ----------------------------------------------------------------------------------------
# DPM-Solver-v3 statistics (--ems)
# ----------------------------------------------------------------------------------------


def add_ems(p: argparse.ArgumentParser, *, rows: bool = False) -> None:
    """``--ems FILE``: statistics written by ``dpmsolver ems`` (``rows``: for compare,
    where they go to the dpmv3 row)."""
    what = (
        "the dpmv3 row (added if --solvers has none) samples with them"
        if rows
        else "sample with DPM-Solver-v3 (dpmv3) using them"
    )
    p.add_argument(
        "--ems",
        default=None,
        metavar="FILE",
        help="statistics from `dpmsolver ems` for this model and guidance scale: " + what,
    )


def load_ems(path: str) -> EMS:
    """Read ``--ems FILE`` (before any work): a UsageError naming ``--ems`` for a missing,
    corrupt or foreign file."""
    try:
        return EMS.load(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--ems: {e}") from None


def ems_option(args: argparse.Namespace) -> EMS | None:
    """``--ems`` with ``--solver`` (before any work): the statistics, or None without
    ``--ems``. They are DPM-Solver-v3's, so ``--solver`` must be ``dpmv3`` or ``auto``,
    which then means ``dpmv3`` (``args.solver`` is set to it)."""
    if args.ems is None:
        return None
    if args.solver not in ("auto", "dpmv3"):
        raise UsageError(
            f"--ems: the statistics are DPM-Solver-v3's and --solver {args.solver} does not use "
            "them; give --solver dpmv3 (or auto, or no --solver), or leave out --ems"
        )
    args.solver = "dpmv3"
    return load_ems(args.ems)


def check_ems(ems: EMS, path: str, model: LoadedModel, guidance: float) -> None:
    """A UsageError naming ``--ems`` when the statistics describe another schedule,
    prediction, guidance scale or sample shape than ``model`` at ``guidance``, or do not
    cover the schedule's range."""
    sched = model.schedule
    lam_a, lam_b = sched.knot(sched.t_max).lam, sched.knot(sched.t_min).lam
    try:
        ems.check(
            schedule=sched,
            prediction=model.prediction,
            guidance_scale=guidance,
            lam_range=(lam_a, lam_b) if math.isfinite(lam_a) and math.isfinite(lam_b) else None,
        )
    except ValueError as e:
        raise UsageError(
            f"--ems {path}: {e} (make statistics for this run with `dpmsolver ems --guidance "
            f"{guidance:g}` and the same --model)"
        ) from None
    if ems.shape not in ((), tuple(model.shape)):
        raise UsageError(
            f"--ems {path}: the statistics describe samples of shape {ems.shape}, the model's "
            f"are {tuple(model.shape)}"
        )


def ems_recipe(ems: EMS, model: LoadedModel, guidance: float, nfe: int) -> Recipe:
    """DPM-Solver-v3 with statistics ``ems`` (checked by :func:`check_ems`) and the official
    code's settings for the budget (:func:`~dpmsolver.solvers.v3.recommended_options`)."""
    options = recommended_options(guidance, nfe, conditional=model.num_classes is not None)
    return Recipe("dpmv3", {"ems": ems, **options})


def ems_budget(budget: Budget, ems: EMS, path: str, model: LoadedModel, guidance: float) -> Budget:
    """``budget`` (of ``--solver dpmv3``) sampling with the statistics of ``--ems path``."""
    check_ems(ems, path, model, guidance)
    cost = budget.evaluations if budget.evaluations is not None else DEFAULT_NFE
    note = f"{budget.note}; " if budget.note else ""
    return dataclasses.replace(
        budget,
        solver=ems_recipe(ems, model, guidance, cost),
        note=f"{note}statistics {path}",
    )
