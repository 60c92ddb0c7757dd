"""``dpmsolver tune`` and ``sample``/``generate --profile`` on the built-in model (tuning
made cheap through :data:`dpmsolver.cli.tune.OPTIONS`), and their error paths."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import dpmsolver.cli.tune as cli_tune
from dpmsolver.cli import main
from dpmsolver.model import sample_batches
from dpmsolver.models import load_builtin
from dpmsolver.schedules import RectifiedFlowSchedule
from dpmsolver.tune import Profile, schedule_fingerprint

from .test_tune import CHEAP as CHEAP_TUNE

pytest.importorskip("scipy")

CHEAP = {
    **CHEAP_TUNE,
    "refine_runs": 4,
    "solvers": (("dpmpp_multistep", {"order": 2}), ("ddim", {})),
    "grids": (("logsnr", None), ("time_uniform", None)),
}
CPU = ["--device", "cpu", "--no-progress"]


def run_cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("tune") / "profile.json"
    saved = dict(cli_tune.OPTIONS)
    cli_tune.OPTIONS.update(CHEAP)
    try:
        code = run_cli(
            "tune",
            "--nfe",
            "5,8",
            "--guidance",
            "3",
            "--pilot",
            "8",
            "--shift-runs",
            "6",
            "--out",
            str(out),
            *CPU,
        )
    finally:
        cli_tune.OPTIONS.clear()
        cli_tune.OPTIONS.update(saved)
    assert code == 0
    yield out


def test_tune_writes_a_profile_for_every_budget(profile_file: Path) -> None:
    prof = Profile.load(profile_file)
    assert {(c.guidance_scale, c.nfe) for c in prof.choices} == {(3.0, 5), (3.0, 8)}
    assert prof.pilot == 8 and prof.prediction == "eps" and prof.evaluations > 0
    prof.check(load_builtin(torch.device("cpu")).schedule, "eps")


def test_sample_with_the_profile_runs_its_choice(
    profile_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    npz = tmp_path / "s.npz"
    args = ["sample", "--profile", str(profile_file), "--nfe", "8", "--guidance", "3"]
    code = run_cli(*args, "--per-class", "1", "--out", "", "--npz", str(npz), *CPU)
    assert code == 0
    assert "tuned profile" in capsys.readouterr().out
    model = load_builtin(torch.device("cpu"))
    prof = Profile.load(profile_file)
    want, _ = sample_batches(
        model,
        torch.arange(10),
        10,
        solver="auto",
        nfe=8,
        guidance=3.0,
        seed=0,
        batch=64,
        device=torch.device("cpu"),
        profile=prof,
    )
    assert np.array_equal(np.load(npz)["samples"], want.numpy())
    choice = prof.choice(8, 3.0)
    assert choice is not None
    other, _ = sample_batches(
        model,
        torch.arange(10),
        10,
        solver="auto",
        nfe=8,
        guidance=3.0,
        seed=0,
        batch=64,
        device=torch.device("cpu"),
    )
    # the profile's choice is not the default recipe (else this test shows nothing)
    assert choice.stage == "default" or not torch.equal(want, other)


def test_a_budget_missing_from_the_profile_falls_back_with_one_warning(
    profile_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    common = ["--nfe", "6", "--per-class", "1", "--out", "", *CPU]
    assert run_cli("sample", "--profile", str(profile_file), "--npz", str(a), *common) == 0
    err = capsys.readouterr().err
    assert err.startswith("dpmsolver: warning:") and err.count("\n") == 1
    assert "no choice for 6 NFE at guidance 3" in err and "default auto recipe" in err
    assert run_cli("sample", "--npz", str(b), *common) == 0
    assert np.array_equal(np.load(a)["samples"], np.load(b)["samples"])


def test_generate_with_the_profile_records_it(
    profile_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["generate", "--num", "4", "--nfe", "5", "--out", str(out), *CPU]
    assert run_cli(*args, "--profile", str(profile_file)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["config"]["profile"]["sha256"]) == 64
    capsys.readouterr()
    # resuming with another configuration (no profile) is refused
    with pytest.raises(SystemExit) as e:
        run_cli(*args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "profile.sha256" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["sample", "generate"])
def test_a_profile_of_another_model_is_a_one_line_error_naming_both(
    command: str, profile_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prof = Profile.load(profile_file)
    other = dataclasses.replace(
        prof, schedule=schedule_fingerprint(RectifiedFlowSchedule()), prediction="flow"
    )
    path = tmp_path / "flow.json"
    other.save(path)
    out = ["--out", str(tmp_path / ("s.png" if command == "sample" else "run"))]
    extra = ["--num", "2"] if command == "generate" else []
    with pytest.raises(SystemExit) as e:
        run_cli(command, "--profile", str(path), "--nfe", "5", *out, *extra, *CPU)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "--profile" in err and "RectifiedFlowSchedule" in err and "DiscreteVPSchedule" in err
    assert "prediction='flow'" in err and "prediction='eps'" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"format": "dpmsolver-profile/0"}), "has format 'dpmsolver-profile/0'"),
        (json.dumps({"format": "dpmsolver-profile/1"}), "is damaged"),
    ],
)
def test_corrupt_or_old_profiles_are_one_line_errors(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        run_cli("sample", "--profile", str(path), "--out", str(tmp_path / "s.png"), *CPU)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--profile" in err
    assert message in err, err
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--solver", "dpmpp_2m"], "--profile holds recipes for --solver auto"),
        (["--grid", "karras"], "--grid: a profile fixes the grid"),
    ],
)
def test_profile_with_another_solver_or_grid_is_refused(
    args: list[str],
    message: str,
    profile_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli(
            "sample", "--profile", str(profile_file), *args, "--out", str(tmp_path / "s.png"), *CPU
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nfe", "5,0"], "--nfe values must be >= 1, got 0"),
        (["--nfe", "five"], "--nfe must be comma-separated integers"),
        (["--guidance", "3,x"], "--guidance must be comma-separated numbers"),
        (["--guidance", "-1"], "--guidance values must be finite numbers >= 0"),
        (["--pilot", "2"], "--pilot must be >= 4, got 2"),
        (["--shift-runs", "-1"], "--shift-runs must be >= 0, got -1"),
        (["--micro-batch", "0"], "--micro-batch must be >= 1, got 0"),
        (["--memo-mb", "-1"], "--memo-mb must be >= 0, got -1"),
        (["--compensation-runs", "-1"], "--compensation-runs must be >= 0, got -1"),
        (["--correction-components", "-1"], "--correction-components must be >= 0, got -1"),
        (["--device", "gpu7"], "--device 'gpu7' is not a device"),
    ],
)
def test_tune_bad_options_exit_2_with_one_line_naming_the_option(
    args: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("tuned despite a bad option")

    monkeypatch.setattr(cli_tune, "tune", no_work)
    with pytest.raises(SystemExit) as e:
        run_cli("tune", *args, "--out", str(tmp_path / "p.json"), "--no-progress")
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_tune_checks_its_output_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("loaded the model before checking --out")

    monkeypatch.setattr(cli_tune, "load_model", no_work)
    for out, message in (
        (tmp_path / "missing" / "p.json", "does not exist"),
        (tmp_path, "is a directory"),
    ):
        with pytest.raises(SystemExit) as e:
            run_cli("tune", "--out", str(out), *CPU)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("dpmsolver: error: --out") and message in err


def test_tune_ctrl_c_exits_130_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def ctrl_c(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_tune, "tune", ctrl_c)
    assert run_cli("tune", "--out", str(tmp_path / "p.json"), *CPU) == 130
    captured = capsys.readouterr()
    assert captured.err.startswith("dpmsolver: interrupted") and captured.err.count("\n") == 1
    assert captured.out == "" and list(tmp_path.iterdir()) == []


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    ("flag", "option", "want"),
    [
        ((), "extrapolate_final", None),
        (("--denoise-final",), "extrapolate_final", False),
        ((), "micro_batch", None),
        (("--micro-batch", "16"), "micro_batch", 16),
        ((), "memo_mb", None),
        (("--memo-mb", "0"), "memo_mb", 0),
        ((), "compensation_runs", None),
        (("--compensation-runs", "0"), "compensation_runs", 0),
        ((), "correction_components", None),
        (("--correction-components", "0"), "correction_components", 0),
    ],
)
def test_flags_reach_tune_as_its_options(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    flag: tuple[str, ...],
    option: str,
    want: object,
) -> None:
    """--denoise-final turns stage (e) off; --micro-batch caps the samples per call;
    --compensation-runs 0 turns stage (f) off; --correction-components 0 turns stage (g) off;
    --memo-mb 0 sends every call to the network."""
    seen: dict[str, object] = {}

    def fake(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(cli_tune, "tune", fake)
    with pytest.raises(_Stop):
        run_cli(
            "tune", "--nfe", "5", "--pilot", "8", "--out", str(tmp_path / "p.json"), *flag, *CPU
        )
    assert seen.get(option) == want


def test_tune_without_scipy_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """scipy is optional for sampling; a tune without it is one line naming the package,
    not a traceback, and writes nothing."""
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import raises ImportError
    out = tmp_path / "p.json"
    code = run_cli("tune", "--nfe", "5", "--pilot", "4", "--out", str(out), *CPU)
    err = capsys.readouterr().err
    assert code == 1 and err == "dpmsolver: error: tune needs scipy: pip install scipy\n", err
    assert not out.exists()


def test_the_demo_extra_installs_what_tune_needs() -> None:
    """The README's first command installs the demo extra and its tune examples follow it."""
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    demo = re.search(r"^demo = \[(.*?)^\]", text, re.M | re.S).group(1)  # type: ignore[union-attr]
    demo = [d.strip().strip('",') for d in demo.splitlines() if d.strip().startswith('"')]
    assert any(d.split(">")[0].split("=")[0] == "scipy" for d in demo), demo
