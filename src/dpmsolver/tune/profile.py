"""The tuned profile: what :func:`dpmsolver.tune` chose, per guidance scale and budget,
as a JSON file with a format version.

:class:`BudgetChoice` is one choice (solver, options, exact knots and what the later stages
fitted on them, with its errors and cost); :class:`Profile` holds them with the schedule's
fingerprint (:func:`schedule_fingerprint`, compared by :func:`same_schedule`) and the
prediction, refuses a schedule or prediction it was not made for
(:class:`ProfileMismatchError`), falls back with a warning for a budget it lacks, and
converts a choice to k-diffusion sigmas, warning for what sigmas cannot carry."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..io import atomic_write_text
from ..parameterization import Prediction
from ..recipe import PolicyRequest, Recipe, resolve
from ..schedules import NoiseSchedule

PROFILE_FORMAT = "dpmsolver-profile/14"


#: Formats :meth:`Profile.load` reads: version 1 had no model-time shifts, version 2 no
#: ``lower_order_final``, version 3 no ``guard_refused``, version 4 no ``x0_norm_cap``,
#: version 5 no ``step_limit``, version 6 no ``compensation``, version 7 no ``correction``,
#: version 8 no ``sigma_max``, version 9 no DPM-Solver-v3 statistics in a choice's options,
#: version 10 no per-step ``orders``, version 11 no UniPC ``corrector_skip`` in a choice's
#: options (a library that reads 11 would fail on it), version 12 no ``pilot_correction``,
#: version 13 no ``step_envelope`` or ``envelope_persistence``.
READABLE_FORMATS: tuple[str, ...] = tuple(f"dpmsolver-profile/{v}" for v in range(1, 15))


class ProfileMismatchError(ValueError):
    """A profile was made for another schedule or prediction than it is used with."""


def schedule_fingerprint(schedule: NoiseSchedule) -> dict[str, Any]:
    """What identifies a schedule: its class, its time range, lambda and the network time on
    17 points of the range (compared with a tolerance by :func:`same_schedule`: a schedule
    rebuilt from a diffusers config in float32 is the same schedule), and a sha256 of both
    on 257 points (for display)."""
    ts = torch.linspace(schedule.t_min, schedule.t_max, 257, dtype=torch.float64)
    h = hashlib.sha256()
    for part in (
        torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64),
        schedule.lambda_(ts),
        schedule.model_time(ts),
    ):
        h.update(part.contiguous().numpy().tobytes())
    # the first point is the start: pure noise on rectified flow (lambda = -inf, kept as is)
    few = ts[::16]
    return {
        "type": type(schedule).__name__,
        "t_min": schedule.t_min,
        "t_max": schedule.t_max,
        "lambda": [float(v) for v in schedule.lambda_(few)],
        "model_time": [float(v) for v in schedule.model_time(few)],
        "sha256": h.hexdigest(),
    }


#: Tolerances of :func:`same_schedule`: float32 rebuilds differ by ~1e-5 in lambda.
_LAMBDA_ATOL, _TIME_RTOL = 1e-3, 1e-4


def same_schedule(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two :func:`schedule_fingerprint` s describe the same schedule: same class and
    time range, lambda within 1e-3 and network times within 1e-4 (relative) at the 17
    points. Fingerprints without the points (older profiles) compare by sha256."""
    if "lambda" not in a or "lambda" not in b:
        return bool(a["sha256"] == b["sha256"])
    if a["type"] != b["type"] or not all(
        math.isclose(a[k], b[k], rel_tol=_TIME_RTOL, abs_tol=1e-9) for k in ("t_min", "t_max")
    ):
        return False
    lam = all(
        x == y or abs(x - y) <= _LAMBDA_ATOL for x, y in zip(a["lambda"], b["lambda"], strict=True)
    )
    time = all(
        math.isclose(x, y, rel_tol=_TIME_RTOL, abs_tol=1e-6)
        for x, y in zip(a["model_time"], b["model_time"], strict=True)
    )
    return lam and time


@dataclass(frozen=True)
class BudgetChoice:
    """What :func:`tune` chose for one guidance scale and budget.

    Attributes:
        nfe: the budget (network evaluations per sample).
        guidance_scale: the classifier-free guidance scale.
        recipe: what to sample with: solver, options, grid or fitted knots
            (:attr:`~dpmsolver.recipe.Recipe.timesteps`, first to last, then the
            data-prediction step to sigma = 0) and what the later stages fitted on them
            (model-time shifts, orders, compensation, correction, the norm cap, the step
            limit and the correction envelope).
        stage: what the choice came from: ``"default"``, ``"selection"``, ``"steps"``,
            ``"shifts"``, ``"orders"``, ``"compensation"`` or ``"correction"`` (stages (d)
            and (e) keep the stage they change).
        calibration_error, heldout_error: RMS error to the reference on the calibration and
            held-out halves of the pilot.
        default_heldout_error: the default recipe's held-out error, for comparison.
        evaluations, seconds: what tuning this budget cost (seconds of wall time, which
            budgets tuned side by side share: :func:`tune`'s ``workers``).
        guard_refused: the stages whose choice the blow-up guard refused, latest first
            (:attr:`TuneOptions.guard_rows`; empty when it refused none).
        pilot_correction: where the step limit was calibrated
            (:attr:`TuneOptions.step_limit_margin`), the largest ratio of a step's correction
            to its first-order step on the pilot (None: not calibrated).
    """

    nfe: int
    guidance_scale: float
    recipe: Recipe
    stage: str
    calibration_error: float
    heldout_error: float
    default_heldout_error: float
    evaluations: int = 0
    seconds: float = 0.0
    guard_refused: tuple[str, ...] = ()
    pilot_correction: float | None = None

    def with_recipe(self, **changes: Any) -> BudgetChoice:
        """This choice with ``changes`` made to its recipe."""
        return dataclasses.replace(self, recipe=dataclasses.replace(self.recipe, **changes))


#: A choice's recipe fields in the profile's JSON, by their key there (the file format
#: predates :attr:`BudgetChoice.recipe`: a choice's recipe is stored flat, beside its errors,
#: and its fitted knots under ``"times"``). A tuned recipe never sets the others (its start,
#: end and final kind are the grid's own).
_RECIPE_KEYS: dict[str, str] = {
    "solver": "solver",
    "options": "options",
    "grid": "grid",
    "rho": "rho",
    "sigma_end": "sigma_end",
    "final_step": "final_step",
    "times": "timesteps",
    "model_shifts": "model_shifts",
    "lower_order_final": "lower_order_final",
    "x0_norm_cap": "x0_norm_cap",
    "step_limit": "step_limit",
    "compensation": "compensation",
    "correction": "correction",
    "sigma_max": "sigma_max",
    "orders": "orders",
    "step_envelope": "step_envelope",
    "envelope_persistence": "envelope_persistence",
}


#: The recipe keys of every format (1 on): a choice without one of them is damaged.
_RECIPE_KEYS_OF_EVERY_FORMAT = (
    "solver",
    "options",
    "grid",
    "rho",
    "sigma_end",
    "final_step",
    "times",
)


def _choice_json(c: BudgetChoice) -> dict[str, Any]:
    """One choice as JSON data: its own fields and its recipe's, flat."""
    data = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "recipe"}
    for key, name in _RECIPE_KEYS.items():
        value = getattr(c.recipe, name)
        data[key] = _options_json(value) if key == "options" else value
    return data


def _choice_of(data: Mapping[str, Any]) -> BudgetChoice:
    """:func:`_choice_json`'s inverse; a key an older format lacks takes the default, and a
    key every format has is required."""
    parse: dict[str, Callable[[Any], Any]] = {
        "times": _floats,
        "model_shifts": _floats,
        "x0_norm_cap": _pairs,
        "compensation": _floats,
        "correction": _rows_of,
        "orders": _ints,
        "step_envelope": _floats,
        "options": _options_of,
    }
    missing = [k for k in _RECIPE_KEYS_OF_EVERY_FORMAT if k not in data]
    if missing:
        raise KeyError(", ".join(missing))
    recipe = Recipe(
        **{
            name: parse.get(key, lambda v: v)(data[key])
            for key, name in _RECIPE_KEYS.items()
            if key in data
        }
    )
    own = {k: v for k, v in data.items() if k not in _RECIPE_KEYS}
    own["guard_refused"] = tuple(str(v) for v in own.get("guard_refused", ()))
    return BudgetChoice(**own, recipe=recipe)


#: What a choice may carry that k-diffusion sigmas cannot (:meth:`Profile.sigmas` warns of
#: each): whether it does, what it does (``{final_step}``: the choice's), what the
#: k-diffusion functions do instead and who runs it as tuned, and the tune setting that
#: leaves it out (None: none does).
_NOT_IN_SIGMAS: tuple[tuple[Callable[[BudgetChoice], bool], str, str, str | None], ...] = (
    (
        lambda c: c.recipe.model_shifts is not None,
        "also moves the network's time at its knots (model_shifts, stage (c))",
        "they are dropped (the choice before stage (c)); dpmsolver.sample and the diffusers "
        "scheduler apply them",
        "shift_runs=0 (CLI: --shift-runs 0)",
    ),
    (
        lambda c: c.recipe.compensation is not None,
        "also compensates its data predictions (compensation, stage (f))",
        "they run without it; dpmsolver.sample and the diffusers scheduler apply it",
        "compensation_runs=0 (CLI: --compensation-runs 0)",
    ),
    (
        lambda c: c.recipe.correction is not None,
        "also corrects its data predictions (correction, stage (g))",
        "they run without it; dpmsolver.sample applies it",
        "correction_components=0 (CLI: --correction-components 0)",
    ),
    (
        lambda c: bool(c.recipe.lower_order_final),
        "lowers its last orders (lower_order_final)",
        "they keep the order to the end; dpmsolver.sample and the diffusers scheduler run it "
        "as tuned",
        None,
    ),
    (
        lambda c: c.recipe.orders is not None,
        "sets the order of each step (orders, stage (h))",
        "they keep their own; dpmsolver.sample and the diffusers scheduler run it as tuned",
        "order_search=False",
    ),
    (
        lambda c: bool(c.recipe.options.get("corrector_skip")),
        "leaves some steps' results uncorrected (UniPC's corrector_skip, stage (i))",
        "they correct after every step; dpmsolver.sample and the diffusers scheduler run it "
        "as tuned",
        "corrector_search=False",
    ),
    (
        lambda c: c.recipe.final_step != "denoise",
        "extrapolates its step into sigma = 0 (final_step={final_step!r})",
        "they end with the denoising step; dpmsolver.sample and the diffusers scheduler run "
        "it as tuned",
        "extrapolate_final=False",
    ),
)


@dataclass(frozen=True)
class Profile:
    """A sampler fitted to one model (:func:`tune`), per guidance scale and budget.

    Attributes:
        schedule: the schedule's fingerprint (:func:`schedule_fingerprint`).
        prediction: what the network predicts.
        choices: one :class:`BudgetChoice` per (guidance scale, budget).
        pilot: pilot noises used (half for calibration, half held out).
        reference_rtol, reference_error: the reference's tolerance and its estimated RMS
            error (the RMS difference to a solve at a 10x tighter tolerance, on
            ``check_rows`` of the pilot).
        evaluations, seconds: the whole tuning cost (reference included).
        library_version: the dpmsolver version that made it.
    """

    schedule: Mapping[str, Any]
    prediction: Prediction
    choices: tuple[BudgetChoice, ...]
    pilot: int
    reference_rtol: float
    reference_error: float
    evaluations: int
    seconds: float
    library_version: str = __version__
    format: str = PROFILE_FORMAT

    # -------------------------------------------------------------- use

    def check(self, schedule: NoiseSchedule, prediction: str) -> None:
        """Raise :class:`ProfileMismatchError` naming both sides unless this profile was
        made for ``schedule`` and ``prediction``."""
        theirs = schedule_fingerprint(schedule)
        if not same_schedule(theirs, self.schedule) or prediction != self.prediction:
            raise ProfileMismatchError(
                f"the profile was made for {self.schedule['type']} (sha256 "
                f"{self.schedule['sha256'][:12]}) with prediction={self.prediction!r}, but it is "
                f"used with {theirs['type']} (sha256 {theirs['sha256'][:12]}) with "
                f"prediction={prediction!r}; tune again for this model"
            )

    def choice(self, nfe: int, guidance_scale: float) -> BudgetChoice | None:
        """The choice for this budget and guidance scale, or None."""
        for c in self.choices:
            if c.nfe == nfe and math.isclose(c.guidance_scale, guidance_scale, rel_tol=1e-9):
                return c
        return None

    def recipe(
        self, nfe: int, guidance_scale: float, schedule: NoiseSchedule, prediction: str
    ) -> Recipe:
        """The recipe for ``nfe`` evaluations at ``guidance_scale`` on ``schedule``; where
        the profile has no such budget or guidance scale, the default policy's recipe with
        a warning naming what the profile holds."""
        self.check(schedule, prediction)
        c = self.choice(nfe, guidance_scale)
        if c is not None:
            return c.recipe
        held = ", ".join(f"(w={x.guidance_scale:g}, nfe={x.nfe})" for x in self.choices)
        warnings.warn(
            f"the profile has no choice for nfe={nfe} at guidance {guidance_scale:g} (it holds "
            f"{held}); using the default solver='auto' recipe",
            stacklevel=3,
        )
        return resolve("auto", PolicyRequest(nfe, guidance_scale, schedule))

    def sigmas(self, nfe: int, guidance_scale: float, schedule: NoiseSchedule) -> list[float]:
        """The chosen knots as k-diffusion sigmas ``sigma / alpha``, ending with 0 (for the
        k-diffusion-style functions). Sigmas cannot carry a choice's model-time shifts
        (stage (c)): they are dropped with a warning, which leaves the choice stage (b) kept
        (tune with ``shift_runs=0`` to keep the profile's errors exact for these functions).
        Nor can they carry the choice's norm cap or step limit
        (:attr:`~dpmsolver.recipe.Recipe.x0_norm_cap`, ``step_limit``), which bind on samples
        thrown off the data: those functions run without them. An extrapolated step into
        sigma = 0 (stage (e)) they take as the denoising step, with a warning."""
        c = self.choice(nfe, guidance_scale)
        if c is None:
            raise KeyError(f"the profile has no choice for nfe={nfe}, guidance {guidance_scale:g}")
        for carries, what, then, leave_out in _NOT_IN_SIGMAS:
            if carries(c):
                tail = f", or tune with {leave_out} for these functions" if leave_out else ""
                does = what.format(final_step=c.recipe.final_step)
                warnings.warn(
                    f"the profile's choice for nfe={nfe} at guidance {guidance_scale:g} "
                    f"{does}, which the k-diffusion functions cannot carry: {then}{tail}",
                    stacklevel=2,
                )
        self.check(schedule, self.prediction)
        grid = c.recipe.plan(schedule, nfe=None if c.recipe.timesteps else nfe).grid
        return grid.ksigmas

    # -------------------------------------------------------------- files

    def to_json(self) -> dict[str, Any]:
        """The profile as JSON-compatible data."""
        data = dataclasses.asdict(dataclasses.replace(self, choices=()))
        data["choices"] = [_choice_json(c) for c in self.choices]
        return data

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile written by :meth:`save`; a clear error for a file that is not one,
        is damaged, or has another format version."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"profile {str(path)!r}: cannot read it ({e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"profile {str(path)!r} is not valid JSON ({e}); tune again") from None
        return cls.from_json(data, f"profile {str(path)!r}")

    @classmethod
    def from_json(cls, data: Any, source: str = "profile") -> Profile:
        """A profile from :meth:`to_json`'s data; ``source`` names it in errors."""
        if not isinstance(data, Mapping) or data.get("format") not in READABLE_FORMATS:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                f"{source} has format {found!r}, expected {PROFILE_FORMAT!r}; "
                "tune again with this version"
            )

        try:
            choices = tuple(_choice_of(c) for c in data["choices"])
            return cls(**{**data, "format": PROFILE_FORMAT, "choices": choices})
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{source} is damaged ({e}); tune again") from None


def _options_json(options: Mapping[str, Any]) -> dict[str, Any]:
    """A choice's solver options as JSON data: DPM-Solver-v3's statistics (an
    :class:`~dpmsolver.ems.EMS` under ``"ems"``) as their own JSON data."""
    from ..ems import EMS

    return {k: v.to_json() if isinstance(v, EMS) else v for k, v in options.items()}


def _options_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`_options_json`'s inverse."""
    from ..ems import EMS

    out = dict(data)
    if isinstance(out.get("ems"), Mapping):
        out["ems"] = EMS.from_json(out["ems"])
    if isinstance(out.get("corrector_skip"), list):  # JSON has no tuples
        out["corrector_skip"] = tuple(out["corrector_skip"])
    return out


def _floats(v: Any) -> tuple[float, ...] | None:
    return None if v is None else tuple(float(x) for x in v)


def _pairs(v: Any) -> tuple[tuple[float, float], ...] | None:
    return None if v is None else tuple((float(a), float(b)) for a, b in v)


def _ints(v: Any) -> tuple[int, ...] | None:
    return None if v is None else tuple(int(x) for x in v)


def _rows_of(v: Any) -> tuple[tuple[float, ...], ...] | None:
    return None if v is None else tuple(tuple(float(x) for x in row) for row in v)
