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
        solver, options: the solver (registry name) and its options (order included).
        grid, rho, sigma_end, final_step: the recipe's grid, as
            :class:`~dpmsolver.recipe.Recipe` (used when ``times`` is None).
        times: schedule times of the fitted noisy knots, first to last (None: the grid's);
            the run ends with the data-prediction step to sigma = 0.
        stage: what the choice came from: ``"default"``, ``"selection"``, ``"steps"``,
            ``"shifts"``, ``"orders"``, ``"compensation"`` or ``"correction"`` (stages (d)
            and (e) keep the stage they change).
        calibration_error, heldout_error: RMS error to the reference on the calibration and
            held-out halves of the pilot.
        default_heldout_error: the default recipe's held-out error, for comparison.
        evaluations, seconds: what tuning this budget cost (seconds of wall time, which
            budgets tuned side by side share: :func:`tune`'s ``workers``).
        model_shifts: stage (c)'s log-SNR offsets of the network's time per noisy knot
            (:attr:`~dpmsolver.recipe.Recipe.model_shifts`), or None.
        lower_order_final: the recipe lowers its last orders whatever the step count
            (:attr:`~dpmsolver.recipe.Recipe.lower_order_final`; None: the default rule).
        guard_refused: the stages whose choice the blow-up guard refused, latest first
            (:attr:`TuneOptions.guard_rows`; empty when it refused none).
        x0_norm_cap: the per-sample bound on the data prediction's norm the recipe samples
            with (:attr:`TuneOptions.norm_cap`; None: none).
        step_limit: the per-sample bound on each step's departure from the first-order
            step the recipe samples with (:attr:`TuneOptions.step_limit`, or calibrated by
            :attr:`TuneOptions.step_limit_margin`; None: none).
        pilot_correction: where the step limit was calibrated, the largest ratio of a
            step's correction to its first-order step on the pilot (None: not calibrated).
        step_envelope: per step, the largest correction norm a sample may make beyond the
            first-order step, calibrated on the pilot (:attr:`TuneOptions.envelope_margin`;
            :attr:`~dpmsolver.recipe.Recipe.step_envelope`), or None.
        envelope_persistence: consecutive steps over the envelope before it binds on a
            sample (:attr:`TuneOptions.envelope_persistence`).
        compensation: stage (f)'s ratios, one per step after the first
            (:attr:`~dpmsolver.recipe.Recipe.compensation`), or None.
        correction: stage (g)'s coordinates, one tuple per step
            (:attr:`~dpmsolver.recipe.Recipe.correction`), or None.
        sigma_max: the k-diffusion sigma where the grid's spacing starts after its first
            step (:attr:`~dpmsolver.recipe.Recipe.sigma_max`; :attr:`TuneOptions.flow_sigma_max`),
            or None.
        orders: stage (h)'s order of each step (:attr:`~dpmsolver.recipe.Recipe.orders`),
            or None.
    """

    nfe: int
    guidance_scale: float
    solver: str
    options: Mapping[str, Any]
    grid: str | None
    rho: float | None
    sigma_end: float | None
    final_step: str
    times: tuple[float, ...] | None
    stage: str
    calibration_error: float
    heldout_error: float
    default_heldout_error: float
    evaluations: int = 0
    seconds: float = 0.0
    model_shifts: tuple[float, ...] | None = None
    lower_order_final: bool | None = None
    guard_refused: tuple[str, ...] = ()
    x0_norm_cap: tuple[tuple[float, float], ...] | None = None
    step_limit: float | None = None
    compensation: tuple[float, ...] | None = None
    correction: tuple[tuple[float, ...], ...] | None = None
    sigma_max: float | None = None
    orders: tuple[int, ...] | None = None
    pilot_correction: float | None = None
    step_envelope: tuple[float, ...] | None = None
    envelope_persistence: int = 1

    def recipe(self) -> Recipe:
        """The choice as a :class:`~dpmsolver.recipe.Recipe`."""
        return Recipe(
            self.solver,
            dict(self.options),
            grid=self.grid,  # type: ignore[arg-type]
            rho=self.rho,
            sigma_max=self.sigma_max,
            sigma_end=self.sigma_end,
            final_step=self.final_step,  # type: ignore[arg-type]
            timesteps=self.times,
            model_shifts=self.model_shifts,
            lower_order_final=self.lower_order_final,
            x0_norm_cap=self.x0_norm_cap,
            step_limit=self.step_limit,
            compensation=self.compensation,
            correction=self.correction,
            orders=self.orders,
            step_envelope=self.step_envelope,
            envelope_persistence=self.envelope_persistence,
        )


#: What a choice may carry that k-diffusion sigmas cannot (:meth:`Profile.sigmas` warns of
#: each): whether it does, what it does (``{final_step}``: the choice's), what the
#: k-diffusion functions do instead and who runs it as tuned, and the tune setting that
#: leaves it out (None: none does).
_NOT_IN_SIGMAS: tuple[tuple[Callable[[BudgetChoice], bool], str, str, str | None], ...] = (
    (
        lambda c: c.model_shifts is not None,
        "also moves the network's time at its knots (model_shifts, stage (c))",
        "they are dropped (the choice before stage (c)); dpmsolver.sample and the diffusers "
        "scheduler apply them",
        "shift_runs=0 (CLI: --shift-runs 0)",
    ),
    (
        lambda c: c.compensation is not None,
        "also compensates its data predictions (compensation, stage (f))",
        "they run without it; dpmsolver.sample and the diffusers scheduler apply it",
        "compensation_runs=0 (CLI: --compensation-runs 0)",
    ),
    (
        lambda c: c.correction is not None,
        "also corrects its data predictions (correction, stage (g))",
        "they run without it; dpmsolver.sample applies it",
        "correction_components=0 (CLI: --correction-components 0)",
    ),
    (
        lambda c: bool(c.lower_order_final),
        "lowers its last orders (lower_order_final)",
        "they keep the order to the end; dpmsolver.sample and the diffusers scheduler run it "
        "as tuned",
        None,
    ),
    (
        lambda c: c.orders is not None,
        "sets the order of each step (orders, stage (h))",
        "they keep their own; dpmsolver.sample and the diffusers scheduler run it as tuned",
        "order_search=False",
    ),
    (
        lambda c: bool(c.options.get("corrector_skip")),
        "leaves some steps' results uncorrected (UniPC's corrector_skip, stage (i))",
        "they correct after every step; dpmsolver.sample and the diffusers scheduler run it "
        "as tuned",
        "corrector_search=False",
    ),
    (
        lambda c: c.final_step != "denoise",
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
            return c.recipe()
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
        Nor can they carry the choice's norm cap (:attr:`BudgetChoice.x0_norm_cap`) or step
        limit (:attr:`BudgetChoice.step_limit`), which bind on samples thrown off the data:
        those functions run without them. An extrapolated step into sigma = 0 (stage (e))
        they take as the denoising step, with a warning."""
        c = self.choice(nfe, guidance_scale)
        if c is None:
            raise KeyError(f"the profile has no choice for nfe={nfe}, guidance {guidance_scale:g}")
        for carries, what, then, leave_out in _NOT_IN_SIGMAS:
            if carries(c):
                tail = f", or tune with {leave_out} for these functions" if leave_out else ""
                does = what.format(final_step=c.final_step)
                warnings.warn(
                    f"the profile's choice for nfe={nfe} at guidance {guidance_scale:g} "
                    f"{does}, which the k-diffusion functions cannot carry: {then}{tail}",
                    stacklevel=2,
                )
        self.check(schedule, self.prediction)
        grid = c.recipe().plan(schedule, nfe=None if c.times else nfe).grid
        return grid.ksigmas

    # -------------------------------------------------------------- files

    def to_json(self) -> dict[str, Any]:
        """The profile as JSON-compatible data."""
        data = dataclasses.asdict(dataclasses.replace(self, choices=()))
        data["choices"] = [
            {
                **dataclasses.asdict(dataclasses.replace(c, options={})),
                "options": _options_json(c.options),
            }
            for c in self.choices
        ]
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

        def floats(v: Any) -> tuple[float, ...] | None:
            return None if v is None else tuple(float(x) for x in v)

        try:
            choices = tuple(
                BudgetChoice(
                    **{
                        **c,
                        "times": floats(c["times"]),
                        "model_shifts": floats(c.get("model_shifts")),
                        "guard_refused": tuple(str(v) for v in c.get("guard_refused", ())),
                        "x0_norm_cap": _pairs(c.get("x0_norm_cap")),
                        "compensation": floats(c.get("compensation")),
                        "correction": _rows_of(c.get("correction")),
                        "orders": _ints(c.get("orders")),
                        "step_envelope": floats(c.get("step_envelope")),
                        "options": _options_of(c["options"]),
                    }
                )
                for c in data["choices"]
            )
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


def _pairs(v: Any) -> tuple[tuple[float, float], ...] | None:
    return None if v is None else tuple((float(a), float(b)) for a, b in v)


def _ints(v: Any) -> tuple[int, ...] | None:
    return None if v is None else tuple(int(x) for x in v)


def _rows_of(v: Any) -> tuple[tuple[float, ...], ...] | None:
    return None if v is None else tuple(tuple(float(x) for x in row) for row in v)
