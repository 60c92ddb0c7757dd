"""``dpmsolver ems`` end to end on the built-in model with tiny sizes (a few grid points,
a few samples: statistics too noisy to sample well with, enough to check the plumbing),
and ``--ems`` on ``sample`` and ``compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from dpmsolver.cli import main
from dpmsolver.ems import EMS, EMSFingerprint, estimate_ems, schedule_fingerprint
from dpmsolver.model import LoadedModel
from dpmsolver.models import load_builtin
from dpmsolver.noise import sample_seeds, seeded_randn
from dpmsolver.recipe import Recipe
from dpmsolver.sampling import build_denoiser

TINY = ["--samples", "8", "--batch", "4", "--points", "6", "--no-progress", "--device", "cpu"]


def run_cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def ems_w2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Statistics of the built-in model at guidance 2 (tiny sizes)."""
    out = tmp_path_factory.mktemp("ems") / "w2.safetensors"
    assert run_cli("ems", "--guidance", "2", "--out", str(out), *TINY) == 0
    return out


def test_ems_writes_the_statistics_of_the_sampling_trajectories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file describes this model and guidance, and holds exactly the statistics of
    trajectories that start from `dpmsolver sample --seed 3`'s noises, labels cycling
    0..9 within each batch of 4."""
    out = tmp_path / "ems.safetensors"
    assert run_cli("ems", "--guidance", "2", "--seed", "3", "--out", str(out), *TINY) == 0
    line = capsys.readouterr().out
    assert "at guidance 2: 8 samples x 6 grid points, 36 network calls in" in line, line
    assert line.rstrip().endswith(f"-> {out}") and line.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ems.safetensors"]  # no .partial

    ems = EMS.load(out)
    model = load_builtin(torch.device("cpu"))
    assert ems.fingerprint == EMSFingerprint(schedule_fingerprint(model.schedule), "eps", 2.0)
    assert ems.source == "estimated" and ems.samples == 8
    assert ems.shape == (1, 8, 8) and ems.lams.numel() == 6
    ems.check(schedule=model.schedule, prediction="eps", guidance_scale=2.0)

    y = torch.arange(4) % 10
    den = build_denoiser(
        model.network,
        "eps",
        cond={"y": y},
        uncond={"y": torch.full_like(y, 10)},
        guidance_scale=2.0,
    )
    noise = seeded_randn(sample_seeds(3, range(8)), model.shape)
    expected = estimate_ems(
        den,
        model.schedule,
        noise=noise,
        prediction="eps",
        guidance_scale=2.0,
        points=6,
        batch_size=4,
        seed=3,
        jvp="vjp",
    )
    for name in ("lams", "l", "s", "b"):
        assert torch.allclose(getattr(ems, name), getattr(expected, name), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------
# resuming
# ----------------------------------------------------------------------------------------

#: Network calls left before :func:`interrupting_model`'s network raises KeyboardInterrupt
#: (as Ctrl-C would); None: never.
INTERRUPT: dict[str, int | None] = {"after": None}


def interrupting_model(device: torch.device) -> LoadedModel:
    """The built-in model whose network is interrupted after ``INTERRUPT["after"]`` calls."""
    model = load_builtin(device)
    net = model.network

    def network(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        left = INTERRUPT["after"]
        if left is not None:
            if left <= 0:
                INTERRUPT["after"] = None
                raise KeyboardInterrupt
            INTERRUPT["after"] = left - 1
        return net(x, t, **kwargs)

    model.network = network
    return model


RESUMABLE = [
    "ems",
    "--model",
    "tests.test_cli_ems:interrupting_model",
    "--guidance",
    "2",
    "--samples",
    "4",
    "--batch",
    "4",
    "--points",
    "20",
    "--no-progress",
    "--device",
    "cpu",
]


def test_an_interrupted_run_resumes_from_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C after 40 of the 60 network calls (3 per grid point) exits 130 and keeps the
    first 8 grid points (one checkpoint chunk) in <out>.partial; the same command then makes
    only the calls of the other 12 and writes what an uninterrupted run writes."""
    out = tmp_path / "ems.safetensors"
    INTERRUPT["after"] = 40
    assert run_cli(*RESUMABLE, "--out", str(out)) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"{out}.partial" in err and "resume" in err, err
    assert not out.exists() and (tmp_path / "ems.safetensors.partial").is_file()

    assert run_cli(*RESUMABLE, "--out", str(out)) == 0
    line = capsys.readouterr().out
    assert "36 network calls" in line and f"resumed from {out}.partial" in line, line
    assert not (tmp_path / "ems.safetensors.partial").exists()

    whole = tmp_path / "whole.safetensors"
    assert run_cli(*RESUMABLE, "--out", str(whole)) == 0
    assert "60 network calls" in capsys.readouterr().out
    a, b = EMS.load(out), EMS.load(whole)
    for name in ("l", "s", "b"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12), name


def test_a_checkpoint_of_another_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, ckpt = tmp_path / "ems.safetensors", tmp_path / "part"
    INTERRUPT["after"] = 40
    assert run_cli(*RESUMABLE, "--out", str(out), "--checkpoint", str(ckpt)) == 130
    assert ckpt.is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(*RESUMABLE, "--out", str(out), "--checkpoint", str(ckpt), "--seed", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("dpmsolver: error: --checkpoint: "), err
    assert "another EMS run" in err and err.count("\n") == 1
    assert not out.exists() and ckpt.is_file()  # kept: the user decides


def test_nan_from_the_network_exits_1_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exact mixture network that turns class 7 NaN below t = 500."""
    out = tmp_path / "ems.safetensors"
    model = ["--model", "tests.generate_models:nan_model", "--guidance", "2"]
    args = ["ems", *model, "--samples", "8", "--batch", "8", "--points", "20"]
    assert run_cli(*args, "--out", str(out), "--no-progress", "--device", "cpu") == 1
    err = capsys.readouterr().err
    assert err.startswith("dpmsolver: error: ") and "NaN/Inf at lambda" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------------------
# bad options
# ----------------------------------------------------------------------------------------

COUNTING = ["--model", "tests.generate_models:counting_model", "--device", "cpu"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--samples", "0"], "--samples must be >= 1, got 0"),
        (["--samples", "100"], "--samples 100 must be a multiple of --batch 64"),
        (["--samples", "8", "--batch", "3"], "--samples 8 must be a multiple of --batch 3"),
        (["--points", "3"], "--points must be >= 4, got 3"),
        (["--probes", "0"], "--probes must be >= 1"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--jvp", "fwd"], "--jvp: 'fwd' is not a method; choose one of: vjp, forward,"),
        (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["--guidance", "inf"], "--guidance must be a finite number >= 0"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
        (["--out", "{tmp}/missing/e.st"], "--out: directory '{tmp}/missing' does not exist"),
        (["--out", "{tmp}"], "--out: '{tmp}' is a directory"),
        (["--checkpoint", "{tmp}/missing/c"], "--checkpoint: directory '{tmp}/missing' does not"),
        (["--checkpoint", "{tmp}/e.st"], "--checkpoint must not be the --out file"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options_exit_2_before_any_work(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line naming the option, exit 2, nothing written and the model never loaded."""
    from tests.generate_models import COUNTS

    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    message = message.replace("{tmp}", str(tmp_path))
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "e.st")]
    COUNTS.update(loads=0, calls=0)
    with pytest.raises(SystemExit) as e:
        run_cli("ems", *COUNTING, "--no-progress", *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert err.startswith("dpmsolver: error: ") and err.count("\n") == 1, err
    assert COUNTS == {"loads": 0, "calls": 0}
    assert list(tmp_path.iterdir()) == []


def test_guidance_on_a_model_without_a_null_label_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli(
            "ems",
            "--model",
            "tests.test_cli_ems:unconditional_model",
            "--guidance",
            "2",
            "--out",
            str(tmp_path / "e.st"),
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--guidance 2:" in err and "not class-conditional" in err, err


def unconditional_model(device: torch.device) -> LoadedModel:
    """The built-in network with its null label fixed: an unconditional model."""
    m = load_builtin(device)
    net = m.network

    def network(x: Tensor, t: Tensor, **_: Any) -> Tensor:
        return net(x, t, y=torch.full((x.shape[0],), 10, dtype=torch.long))

    return LoadedModel(network, m.schedule, "eps", m.shape, num_classes=None, null_label=None)


def test_an_unconditional_model_gets_unguided_statistics(tmp_path: Path) -> None:
    out = tmp_path / "u.st"
    args = ["ems", "--model", "tests.test_cli_ems:unconditional_model", "--out", str(out)]
    assert run_cli(*args, *TINY) == 0
    assert EMS.load(out).guidance_scale == 1.0


# ----------------------------------------------------------------------------------------
# --ems on sample and compare
# ----------------------------------------------------------------------------------------


def test_sample_with_ems_runs_dpmv3_on_those_statistics(
    ems_w2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ems (with --solver auto, the default) samples what dpmv3 with the statistics
    samples, which is not what dpmv3 without them samples."""
    common = ["sample", "--guidance", "2", "--nfe", "5", "--labels", "1,7,3"]
    common += ["--out", "", "--no-progress", "--device", "cpu"]
    with_ems, without = tmp_path / "a.npz", tmp_path / "b.npz"
    assert run_cli(*common, "--ems", str(ems_w2), "--npz", str(with_ems)) == 0
    line = capsys.readouterr().out
    assert f"with dpmv3, guidance 2: 5 network evaluations per sample (statistics {ems_w2})" in (
        line
    ), line
    assert run_cli(*common, "--solver", "dpmv3", "--npz", str(without)) == 0
    x = np.load(with_ems)["samples"]
    assert np.isfinite(x).all() and not np.allclose(x, np.load(without)["samples"])

    from dpmsolver.model import sample_batches

    model = load_builtin(torch.device("cpu"))
    recipe = Recipe("dpmv3", {"ems": EMS.load(ems_w2), "order": 2, "corrector": "pseudo"})
    expected, _ = sample_batches(
        model,
        torch.tensor([1, 7, 3]),
        3,
        solver=recipe,
        nfe=5,
        guidance=2.0,
        seed=0,
        batch=64,
        device=torch.device("cpu"),
    )
    assert np.array_equal(x, expected.numpy())


def _foreign(tmp_path: Path, **fingerprint: Any) -> Path:
    """Synthetic statistics saved with a fingerprint that names another run."""
    base = EMS.synthetic(points=20)
    path = tmp_path / f"{'-'.join(fingerprint)}.st"
    model = load_builtin(torch.device("cpu"))
    fp = {"schedule": schedule_fingerprint(model.schedule), "prediction": "eps"}
    fp.update(guidance_scale=3.0, **fingerprint)
    EMS(base.lams, base.l, base.s, base.b, EMSFingerprint(**fp), source="synthetic").save(path)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "--ems", "{w2}"], "--ems {w2}: ems was computed for guidance_scale=2 but"),
        (["sample", "--ems", "{w2}", "--guidance", "2.5"], "guidance_scale=2 but the sampling"),
        (["compare", "--ems", "{w2}", "--nfe", "5"], "--ems {w2}: ems was computed for guid"),
        (["sample", "--ems", "{w2}", "--solver", "dpmpp_2m"], "--ems: the statistics are DPM-S"),
        (["sample", "--ems", "{tmp}/none.st"], "--ems: ems file '{tmp}/none.st' does not exist"),
        (["sample", "--ems", "{tmp}/x.txt"], "--ems: ems file '{tmp}/x.txt' is corrupt or not"),
        (["sample", "--ems", "{schedule}"], "was computed for schedule another but the sampl"),
        (["sample", "--ems", "{prediction}"], "was computed for prediction='v' but the sampling"),
        (["sample", "--ems", "{narrow}"], "ems grid covers lambda in [-1, 1] but the sampling"),
        (["generate", "--num", "2", "--ems", "{w2}"], "--ems {w2}: ems was computed for guid"),
        (["generate", "--num", "2", "--ems", "{w2}", "--solver", "ddim"], "--ems: the statis"),
    ],
)
def test_ems_that_does_not_fit_the_run_exits_2_naming_ems(
    args: list[str],
    message: str,
    ems_w2: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "x.txt").write_text("not statistics")
    narrow = EMS.synthetic(lam_range=(-1.0, 1.0), points=20)
    model = load_builtin(torch.device("cpu"))
    fp = EMSFingerprint(schedule_fingerprint(model.schedule), "eps", 3.0)
    (tmp_path / "n").mkdir()
    EMS(narrow.lams, narrow.l, narrow.s, narrow.b, fp, source="synthetic").save(
        tmp_path / "n" / "narrow.st"
    )
    fill = {
        "{w2}": str(ems_w2),
        "{tmp}": str(tmp_path),
        "{schedule}": str(_foreign(tmp_path / "n", schedule="another")),
        "{prediction}": str(_foreign(tmp_path / "n", prediction="v")),
        "{narrow}": str(tmp_path / "n" / "narrow.st"),
    }
    for key, value in fill.items():
        args = [a.replace(key, value) for a in args]
        message = message.replace(key, value)
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / ("run" if args[0] == "generate" else "o.png")
    with pytest.raises(SystemExit) as e:
        run_cli(*args, "--out", str(out), "--device", "cpu")
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert err.startswith("dpmsolver: error: --ems") and err.count("\n") == 1, err
    assert sorted(tmp_path.rglob("*")) == before


def test_compare_with_ems_adds_a_dpmv3_row_on_the_statistics(
    ems_w2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    import dpmsolver.cli.sample as sample_cmd

    used: list[Any] = []
    real = sample_cmd.sample_batches

    def spy(*args: Any, **kwargs: Any) -> Any:
        used.append(kwargs["solver"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_cmd, "sample_batches", spy)
    out = tmp_path / "c.png"
    args = ["compare", "--ems", str(ems_w2), "--guidance", "2", "--solvers", "dpmpp_2m"]
    assert run_cli(*args, "--nfe", "5", "--out", str(out), "--device", "cpu") == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert used[0] == "dpmpp_2m" and len(used) == 2
    assert isinstance(used[1], Recipe) and used[1].solver == "dpmv3"
    assert used[1].options["ems"].fingerprint == EMS.load(ems_w2).fingerprint


def test_generate_with_ems_records_the_statistics_in_its_configuration(
    ems_w2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run is dpmv3 on the statistics (other samples than dpmv3 without them), its
    manifest identifies them, and resuming the directory with other statistics is refused."""
    import json

    from dpmsolver.generate import read_samples

    common = ["generate", "--num", "3", "--guidance", "2", "--nfe", "5", "--no-progress"]
    common += ["--device", "cpu"]
    run = tmp_path / "run"
    assert run_cli(*common, "--ems", str(ems_w2), "--out", str(run)) == 0
    assert f"statistics {ems_w2}" in capsys.readouterr().out
    config = json.loads((run / "manifest.json").read_text())["config"]
    assert config["solver"] == "dpmv3" and config["ems"]["samples"] == 8
    assert config["ems"]["points"] == 6 and len(config["ems"]["sha256"]) == 64
    plain = tmp_path / "plain"
    assert run_cli(*common, "--solver", "dpmv3", "--out", str(plain)) == 0
    assert "ems" not in json.loads((plain / "manifest.json").read_text())["config"]
    x, y = read_samples(run)["samples"], read_samples(plain)["samples"]
    assert np.isfinite(x).all() and not np.allclose(x, y)

    other = tmp_path / "other.st"
    ems = EMS.load(ems_w2)
    EMS(ems.lams, ems.l, ems.s * 0.5, ems.b, ems.fingerprint, samples=8).save(other)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(*common, "--ems", str(other), "--out", str(run))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "ems.sha256" in err, err


@pytest.mark.parametrize("command", ["sample", "generate"])
def test_ems_with_a_profile_is_refused_naming_both(
    command: str, ems_w2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A profile picks its own solver and --ems runs dpmv3: one line, exit 2, before work."""
    args = ["--ems", str(ems_w2), "--profile", str(tmp_path / "p.json"), "--guidance", "2"]
    out = ["--out", str(tmp_path / ("s.png" if command == "sample" else "run"))]
    extra = ["--num", "3"] if command == "generate" else []
    with pytest.raises(SystemExit) as e:
        run_cli(command, *args, *out, *extra, "--device", "cpu", "--no-progress")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "--profile and --ems" in err and not (tmp_path / "run").exists()


def test_generate_refuses_ems_with_a_profile(ems_w2: Path, tmp_path: Path) -> None:
    from dpmsolver.generate import generate
    from dpmsolver.tune import Profile
    from dpmsolver.tune import schedule_fingerprint as tune_fingerprint

    model = load_builtin(torch.device("cpu"))
    profile = Profile(tune_fingerprint(model.schedule), "eps", (), 8, 1e-5, 0.0, 0, 0.0)
    with pytest.raises(ValueError, match="ems= and profile= exclude each other"):
        generate(model, 3, tmp_path / "run", ems=EMS.load(ems_w2), profile=profile)
