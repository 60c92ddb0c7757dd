"""Large-scale generation: resumable after SIGKILL, bit-identical across batch sizes and
process counts, checksummed shards, refused configuration changes, NaN policies.

All runs use the exact Gaussian-mixture "network" in the built-in model's format
(``dpmsolver.models.exact_model``) or variants of it (tests/generate_models.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dpmsolver import generate as gen
from dpmsolver.cli import generate as cli_gen
from dpmsolver.cli import main
from dpmsolver.models import exact_model
from tests import generate_models as models

ROOT = Path(__file__).resolve().parents[1]
# Small enough to be quick, large enough for several shards, a short last shard and a
# short last micro-batch in each shard (72 = 3 * 20 + 12, 20 = 8 + 8 + 4, 12 = 8 + 4).
RUN: dict[str, Any] = dict(guidance=3.0, nfe=6, shard_size=20, micro_batch=8)
NUM = 72
CLI_RUN = [
    "--guidance",
    "3",
    "--nfe",
    "6",
    "--shard-size",
    "20",
    "--micro-batch",
    "8",
    "--no-progress",
]


def env() -> dict[str, str]:
    """Subprocesses import the library from this checkout and the test models from tests/;
    one thread each, as torchrun gives its workers."""
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def files(out: Path) -> dict[str, bytes]:
    """Every shard file and the manifest, by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".npz", ".json")}


def assert_all_samples_once(out: Path, num: int) -> None:
    data = gen.read_samples(out)
    assert data["indices"].tolist() == list(range(num))  # none missing, none twice
    assert data["labels"].tolist() == [i % 10 for i in range(num)]
    assert np.isfinite(data["samples"]).all() and data["samples"].dtype == np.float32


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference")
    manifest = gen.generate(exact_model(), NUM, out, batch_size=64, **RUN)
    assert manifest.complete and manifest.samples == NUM and len(manifest.shards) == 4
    assert_all_samples_once(out, NUM)
    return out


def npz_files(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in files(out).items() if k.endswith(".npz")}


# ----------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["auto", "dpmpp_2m_sde"])
def test_batch_size_does_not_change_a_bit(tmp_path: Path, solver: str) -> None:
    """Batch sizes 1, 7 and 64 write byte-identical shards and manifests, with a network
    whose output depends on the call's row count (as real kernels' do) and with a
    stochastic solver (its noise streams are per sample too)."""
    model = models.call_size_sensitive_model()
    outs = []
    for batch in (1, 7, 64):
        outs.append(tmp_path / f"b{batch}")
        gen.generate(model, 40, outs[-1], batch_size=batch, solver=solver, **RUN)
    assert files(outs[0]) == files(outs[1]) == files(outs[2])
    # The rows per call do change this network's samples: that is why the micro-batch
    # size is part of the configuration and the batch size is not.
    gen.generate(
        model, 40, tmp_path / "m7", batch_size=7, solver=solver, **{**RUN, "micro_batch": 7}
    )
    a, b = gen.read_samples(outs[0]), gen.read_samples(tmp_path / "m7")
    assert not np.array_equal(a["samples"], b["samples"])


def builtin_model() -> Any:
    """The built-in digits model (shipped with the package)."""
    from dpmsolver.models import load_builtin

    return load_builtin(torch.device("cpu"))


def test_builtin_model_batch_sizes_agree_bit_for_bit(tmp_path: Path) -> None:
    """The real U-Net (whose CPU kernels depend on the row count) through the CLI: batch
    sizes 1, 7 and 64 give byte-identical shards; the manifest names its weight file's
    sha256."""
    import hashlib

    builtin_model()
    from dpmsolver.digits import load as digits

    for batch in (1, 7, 64):
        args = [
            "generate",
            "--num",
            "24",
            "--out",
            str(tmp_path / f"b{batch}"),
            "--batch",
            str(batch),
            "--nfe",
            "4",
            "--shard-size",
            "24",
            "--micro-batch",
            "8",
            "--device",
            "cpu",
            "--no-progress",
        ]
        assert main(args) == 0
    assert files(tmp_path / "b1") == files(tmp_path / "b7") == files(tmp_path / "b64")
    weights = (digits.WEIGHTS_DIR / digits.DENOISER_FILE).read_bytes()
    model_id = gen.Manifest.load(tmp_path / "b1").config["model"]["id"]
    assert model_id["sha256"] == hashlib.sha256(weights).hexdigest()
    assert np.isfinite(gen.read_samples(tmp_path / "b1")["samples"]).all()


def test_micro_batching_keeps_the_exact_model_unchanged(reference: Path) -> None:
    """The exact model is batch-invariant, so grouping its calls changes nothing: the
    shards equal plain batched sampling of the same indices."""
    from dpmsolver.model import sample_indices

    data = gen.read_samples(reference)
    model = exact_model()
    direct = sample_indices(
        model,
        list(range(NUM)),
        torch.arange(NUM) % 10,
        solver="auto",
        nfe=6,
        guidance=3.0,
        seed=0,
        device=torch.device("cpu"),
    ).x
    assert np.array_equal(data["samples"], direct.numpy())


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dpmsolver.cli",
        "generate",
        "--num",
        str(NUM),
        "--out",
        str(out),
        "--model",
        "tests.generate_models:slow_exact_model",
        "--batch",
        "8",
        *CLI_RUN,
    ]
    proc = subprocess.Popen(
        cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while len(list(out.glob("shard-*.json"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard appeared in 60 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.with_suffix(".npz").name for p in out.glob("shard-*.json")}
    assert 2 <= len(done) < 4, "the run was not interrupted part-way"
    assert not json.loads((out / "manifest.json").read_text())["summary"]["complete"]
    stamps = {n: (out / n).stat().st_mtime_ns for n in done}

    resumed = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert {n: (out / n).stat().st_mtime_ns for n in done} == stamps  # finished work kept
    assert npz_files(out) == npz_files(reference)
    assert not list(out.glob(".*.tmp"))
    assert_all_samples_once(out, NUM)


def test_ctrl_c_exits_130_with_one_line_and_the_same_command_resumes(
    tmp_path: Path, reference: Path
) -> None:
    """SIGINT (Ctrl-C) part-way: exit status 130, one line on stderr saying how to resume,
    no traceback, no temporary files; the same command finishes the run, byte-identical
    to an uninterrupted one."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dpmsolver.cli",
        "generate",
        "--num",
        str(NUM),
        "--out",
        str(out),
        "--model",
        "tests.generate_models:slow_exact_model",
        "--batch",
        "8",
        *CLI_RUN,
    ]
    # A process started in the background by a shell without job control ignores SIGINT;
    # give the child Python's usual handler whatever started the tests.
    proc = subprocess.Popen(
        cmd,
        env=env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not list(out.glob("shard-*.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard appeared in 60 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr == (
        f"dpmsolver: interrupted; the finished shards in {out} are kept: run the same command "
        "again to resume\n"
    )
    assert stdout == ""
    done = {p.with_suffix(".npz").name for p in out.glob("shard-*.json")}
    assert 1 <= len(done) < 4, "the run was not interrupted part-way"
    assert not list(out.glob(".*.tmp"))

    resumed = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{NUM} of {NUM} samples" in resumed.stdout
    assert npz_files(out) == npz_files(reference)
    assert_all_samples_once(out, NUM)


def test_steps_instead_of_nfe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """heun: 5 steps cost 9 evaluations, so steps=5 writes the samples nfe=9 does; steps
    are part of the configuration when given (and absent otherwise, so that directories of
    earlier runs stay resumable)."""
    common: dict[str, Any] = {**RUN, "solver": "heun"}
    del common["nfe"]
    by_steps = gen.generate(exact_model(), 30, tmp_path / "steps", steps=5, **common)
    by_nfe = gen.generate(exact_model(), 30, tmp_path / "nfe", nfe=9, **common)
    assert by_steps.config["steps"] == 5 and by_steps.config["nfe"] is None
    assert "steps" not in by_nfe.config
    assert npz_files(tmp_path / "steps") == npz_files(tmp_path / "nfe")
    with pytest.raises(gen.ConfigMismatchError, match="steps: directory has 5, this run 6"):
        gen.generate(exact_model(), 30, tmp_path / "steps", steps=6, **common)
    # The CLI: --steps, and a default budget heun can spend (9, the largest up to 10).
    cli = ["generate", "--num", "30", "--model", "dpmsolver.models:exact_model", "--solver"]
    cli += ["heun", "--guidance", "3", "--shard-size", "20", "--micro-batch", "8"]
    cli += ["--device", "cpu"]  # where the runs above ran (the CLI's default is auto)
    assert main([*cli, "--out", str(tmp_path / "cli_steps"), "--steps", "5", "--no-progress"]) == 0
    assert "9 network evaluations per sample on 5 steps" in capsys.readouterr().out
    assert main([*cli, "--out", str(tmp_path / "cli_nfe"), "--no-progress"]) == 0
    assert "heun cannot spend the default 10 evaluations exactly; it spends 9" in (
        capsys.readouterr().out
    )
    assert gen.Manifest.load(tmp_path / "cli_nfe").config["nfe"] == 9
    for name in ("cli_steps", "cli_nfe"):
        assert npz_files(tmp_path / name) == npz_files(tmp_path / "nfe")


def test_torchrun_two_processes_equal_one(tmp_path: Path) -> None:
    common = [
        "generate",
        "--num-samples",
        "50",
        "--model",
        "dpmsolver.models:exact_model",
        *CLI_RUN,
    ]
    one = subprocess.run(
        [sys.executable, "-m", "dpmsolver.cli", *common, "--out", str(tmp_path / "one")],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "dpmsolver.cli",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("50 of 50 samples") == 1  # rank 0 reports
    assert files(tmp_path / "one") == files(tmp_path / "two")  # manifest included


def test_torchrun_a_failing_process_stops_all_without_a_hang(tmp_path: Path) -> None:
    """Sample 25 (class 7) turns NaN in process 1's shard: both processes stop with an
    error, process 0's finished shard is kept and recorded, the bad shard is not written."""
    labels = ",".join("7" if i == 25 else "0" for i in range(40))
    out = tmp_path / "run"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "dpmsolver.cli",
            "generate",
            "--num-samples",
            "40",
            "--out",
            str(out),
            "--model",
            "tests.generate_models:nan_model",
            "--labels",
            labels,
            *CLI_RUN,
        ],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode != 0
    assert re.search(r"indices 25 \(step \d\)", run.stderr), run.stderr
    assert "stopped because process 1 of 2 failed" in run.stderr
    assert [s.status for s in gen.Manifest.load(out).shards] == ["complete", "pending"]
    assert not (out / "shard-000001.npz").exists()


# ----------------------------------------------------------------------------------------
# resume and refusal
# ----------------------------------------------------------------------------------------


def test_damaged_shards_are_detected_and_regenerated(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    gen.generate(exact_model(), NUM, out, batch_size=16, **RUN)
    original = files(out)
    flipped = bytearray((out / "shard-000000.npz").read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    (out / "shard-000000.npz").write_bytes(bytes(flipped))  # corrupted, same size
    data = (out / "shard-000001.npz").read_bytes()
    (out / "shard-000001.npz").write_bytes(data[: len(data) // 3])  # truncated
    (out / "shard-000002.json").unlink()  # killed between the file and its record
    untouched = (out / "shard-000003.npz").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"shard-000000.npz does not match its sha256"):
        gen.read_samples(out)

    manifest = gen.generate(exact_model(), NUM, out, batch_size=32, **RUN)
    assert manifest.complete and manifest.samples == NUM
    assert (out / "shard-000003.npz").stat().st_mtime_ns == untouched
    assert files(out) == original
    assert npz_files(out) == npz_files(reference)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(seed=1), "seed: directory has 0, this run 1"),
        (dict(nfe=8), "nfe: directory has 6, this run 8"),
        (dict(micro_batch=4), "micro_batch: directory has 8, this run 4"),
        (dict(labels=[1, 2]), "labels.classes"),
        (dict(num=80), "num: directory has 72, this run 80"),
        (dict(model=models.call_size_sensitive_model()), "model.name"),
    ],
)
def test_a_changed_configuration_is_refused(
    tmp_path: Path, change: dict[str, Any], named: str
) -> None:
    out = tmp_path / "run"
    gen.generate(exact_model(), NUM, out, **RUN)
    before = files(out)
    args: dict[str, Any] = {"model": exact_model(), "num": NUM, **RUN, **change}
    with pytest.raises(gen.ConfigMismatchError, match=named):
        gen.generate(args.pop("model"), args.pop("num"), out, **args)
    assert files(out) == before
    # What does not change the output may change: batch size, progress.
    gen.generate(exact_model(), NUM, out, batch_size=3, progress=True, **RUN)
    assert files(out) == before


def test_shards_of_another_run_are_not_overwritten_without_a_manifest(tmp_path: Path) -> None:
    out = tmp_path / "run"
    gen.generate(exact_model(), NUM, out, **RUN)
    (out / "manifest.json").unlink()
    with pytest.raises(
        gen.ConfigMismatchError,
        match=r"shard-000000\.json from a run with a different configuration",
    ):
        gen.generate(exact_model(), NUM, out, **{**RUN, "seed": 5})
    manifest = gen.generate(exact_model(), NUM, out, **RUN)  # same run: manifest rebuilt
    assert manifest.complete and (out / "manifest.json").exists()


def test_cli_refuses_a_changed_configuration_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "generate",
        "--num",
        "10",
        "--out",
        str(tmp_path),
        "--model",
        "dpmsolver.models:exact_model",
        *CLI_RUN,
    ]
    assert main(args) == 0
    assert "10 of 10 samples" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--guidance", "2"])
    assert exit_info.value.code == 2
    assert "guidance: directory has 3.0, this run 2.0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# non-finite samples
# ----------------------------------------------------------------------------------------


def test_nan_stop_names_the_samples_and_writes_no_bad_shard(tmp_path: Path) -> None:
    with pytest.raises(
        gen.GenerationError, match=r"indices 7 \(step (\d)\), 17 \(step \1\); first at step \1"
    ) as info:
        gen.generate(models.nan_model(), NUM, tmp_path, batch_size=64, **RUN)
    assert "Shard 0 (shard-000000.npz) was not written" in str(info.value)
    assert not (tmp_path / "shard-000000.npz").exists()
    manifest = gen.Manifest.load(tmp_path)  # written on the way out
    assert [s.status for s in manifest.shards] == ["pending"] * 4


def test_nan_skip_records_the_samples_and_keeps_the_rest(tmp_path: Path, reference: Path) -> None:
    manifest = gen.generate(
        models.nan_model(), NUM, tmp_path, batch_size=64, on_nonfinite="skip", **RUN
    )
    bad = [i for i in range(NUM) if i % 10 == 7]
    assert [f.index for f in manifest.failed] == bad
    assert len({f.step for f in manifest.failed}) == 1
    assert all(s.status == "partial" for s in manifest.shards) and manifest.complete
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["summary"]["failed"] == len(bad) and on_disk["summary"]["samples"] == NUM - len(
        bad
    )
    data, ref = gen.read_samples(tmp_path), gen.read_samples(reference)
    keep = [i for i in range(NUM) if i % 10 != 7]
    assert data["indices"].tolist() == keep
    # Rows of a network call are independent: the others are the clean model's samples.
    assert np.array_equal(data["samples"], ref["samples"][keep])

    # Resuming keeps the partial shards (a retry would fail the same way) and their record.
    before = files(tmp_path)
    again = gen.generate(
        models.nan_model(), NUM, tmp_path, batch_size=8, on_nonfinite="skip", **RUN
    )
    assert files(tmp_path) == before and again.failed == manifest.failed
    # ... and under "stop" the run cannot be declared finished: it names them.
    with pytest.raises(
        gen.GenerationError, match=r"went non-finite in an earlier run.*7 \(step \d\), 17"
    ):
        gen.generate(models.nan_model(), NUM, tmp_path, **RUN)


# ----------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(solver="dpmpp_adaptive"), ValueError, "solver='dpmpp_adaptive' is adaptive"),
        (dict(solver="nope"), ValueError, "solver='nope' is not supported"),
        (dict(solver="dpmpp_3s", nfe=8), ValueError, "nfe=8 cannot be spent"),
        (dict(nfe=5, steps=3), ValueError, "give at most one of nfe and steps"),
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(micro_batch=0), ValueError, "micro_batch must be >= 1"),
        (dict(shard_size=2.5), TypeError, "shard_size must be an integer"),
        (dict(on_nonfinite="retry"), ValueError, "on_nonfinite='retry'"),
        (dict(labels=[3, 10]), ValueError, r"labels must lie in \[0, 9\]"),
        (dict(labels="all"), ValueError, "labels must be 'cycle' or a non-empty list"),
        (dict(guidance=float("nan")), ValueError, "guidance must be finite"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
    ],
)
def test_bad_arguments_fail_before_anything_is_written(
    tmp_path: Path, kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        gen.generate(exact_model(), 10, tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_cli_bad_model_spec_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["generate", "--num", "4", "--out", str(tmp_path), "--model", "no_such_module:factory"]
        )
    assert exit_info.value.code == 2
    assert "--model 'no_such_module:factory': cannot import it" in capsys.readouterr().err


@pytest.mark.parametrize(("rank", "gpus", "index"), [(0, 1, 0), (1, 1, 0), (3, 2, 1), (2, 4, 2)])
def test_torchrun_ranks_share_the_gpus_round_robin(
    monkeypatch: pytest.MonkeyPatch, rank: int, gpus: int, index: int
) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert cli_gen._rank_device(torch.device("cuda")) == torch.device("cuda", index)
    assert cli_gen._rank_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert cli_gen._rank_device(torch.device("cpu")) == torch.device("cpu")
    assert os.environ["LOCAL_RANK"] == str(rank)
