"""The three shipped models through ``load_model`` and every CLI command that takes
``--model``: the digits U-Net (eps, discrete VP), the rectified-flow transformer (flow) and
the EDM U-Net (x0, VE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dpmsolver.cli.tune as cli_tune
from dpmsolver.cli import main
from dpmsolver.digits import load as digits
from dpmsolver.models import BUILTIN, load_model
from dpmsolver.schedules import DiscreteVPSchedule, RectifiedFlowSchedule, VESchedule
from dpmsolver.tune import Profile

CPU = ["--device", "cpu", "--no-progress"]
KINDS = {
    "builtin": (DiscreteVPSchedule, "eps", digits.DENOISER_FILE),
    "builtin-flow": (RectifiedFlowSchedule, "flow", digits.FLOW_FILE),
    "builtin-edm": (VESchedule, "x0", digits.EDM_FILE),
}


def test_every_builtin_name_has_a_loader() -> None:
    assert set(BUILTIN) == set(KINDS)


@pytest.mark.parametrize("spec", sorted(KINDS))
def test_load_model_describes_the_model(spec: str) -> None:
    sched_type, prediction, _ = KINDS[spec]
    m = load_model(spec, torch.device("cpu"))
    assert isinstance(m.schedule, sched_type) and m.prediction == prediction
    assert m.shape == (1, 8, 8) and m.num_classes == 10 and m.null_label == 10
    if spec == "builtin-flow":
        assert m.schedule.shift == digits.FLOW_SCHEDULE["shift"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("spec", ["builtin-flow", "builtin-edm"])
def test_sample_and_generate_run_on_the_model(spec: str, tmp_path: Path) -> None:
    npz = tmp_path / "s.npz"
    args = ["--guidance", "3", "--nfe", "8", "--per-class", "1", "--out", "", "--npz", str(npz)]
    code = main(["sample", "--model", spec, *args, *CPU])
    assert code == 0
    x = np.load(npz)["samples"]
    assert x.shape[0] == 10 and np.isfinite(x).all()
    out = tmp_path / "run"
    args = ["--num", "4", "--nfe", "5", "--out", str(out)]
    assert main(["generate", "--model", spec, *args, *CPU]) == 0
    ident = json.loads((out / "manifest.json").read_text())["config"]
    assert KINDS[spec][2] in json.dumps(ident)  # identified by its own weight file


def test_tune_fits_the_flow_model(tmp_path: Path) -> None:
    out = tmp_path / "flow.json"
    from .test_tune import CHEAP  # here: test_tune skips its module without scipy

    saved = dict(cli_tune.OPTIONS)
    cli_tune.OPTIONS.update(
        {
            **CHEAP,
            "solvers": (("dpmpp_multistep", {"order": 2}), ("ddim", {})),
            "grids": (("time_uniform", None),),
        }
    )
    try:
        args = ["--nfe", "5", "--guidance", "3", "--pilot", "8", "--out", str(out)]
        code = main(["tune", "--model", "builtin-flow", *args, *CPU])
    finally:
        cli_tune.OPTIONS.clear()
        cli_tune.OPTIONS.update(saved)
    assert code == 0
    prof = Profile.load(out)
    assert prof.prediction == "flow" and [c.nfe for c in prof.choices] == [5]
