"""`adrel train`: clear failures (all config errors at once, missing data) and resume of a
whole job after its driver was SIGKILLed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from tests.pipeline.test_ray_train import (
    STALE_UPLOAD,
    plant_stale_upload,
    registered_checkpoints,
    write_keyword_tasks,
)

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path, enc, **sections) -> Path:
    train = write_keyword_tasks(tmp_path / "data" / "train", 120, 0)
    dev = write_keyword_tasks(tmp_path / "data" / "dev", 40, 1)
    cfg = {
        "workdir": str(tmp_path / "work"),
        "data": {"train_root": str(train), "dev_root": str(dev), "max_length": 32},
        "model": {"base_model": str(enc), "head_dropout": 0.0, "adapter": {"r": 4, "n_up": 2}},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "batch_size": 16, "max_steps": 80},
        "eval": {"every_steps": 30},
        "checkpoint": {"every_steps": 10, "keep": 3},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        "tracking": {"experiment": "cli-test", "log_every_steps": 5},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bad_config_reports_every_error_and_exits_2(tmp_path, tiny_encoder_dir, capsys):
    import ray

    cfg = _config(tmp_path, tiny_encoder_dir)
    was_running = ray.is_initialized()
    rc = main(
        [
            "train",
            "--config",
            str(cfg),
            "--set",
            "optim.lr=-1",
            "--set",
            "model.adapter.r=0",
            "--set",
            "sampling.strategy=roundrobin",
            "--set",
            "scaling.num_workers=0",
            "--set",
            "optim.bogus=3",
            "--run-name",
            "2026-11-29",  # a name, though YAML would read a date
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("adrel train: error: invalid configuration")
    for needle in (
        "optim.lr",
        "(got -1)",
        "r must be an integer >= 1, got 0",
        "sampling.strategy",
        "'roundrobin'",
        "scaling.num_workers",
        "optim.bogus: unknown field",
    ):
        assert needle in err, err
    assert "run_name" not in err, err
    assert "Traceback" not in err
    assert ray.is_initialized() == was_running  # refused before any cluster was started


def test_num_cpus_is_a_whole_number_of_at_least_one(capsys):
    for command in ("train", "retrain", "serve"):
        with pytest.raises(SystemExit) as e:
            main([command, "--num-cpus", "-3"])
        assert e.value.code == 2
        assert "argument --num-cpus: at least 1 CPU, got -3" in capsys.readouterr().err


def test_missing_config_and_missing_task_data(tmp_path, tiny_encoder_dir, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg = _config(tmp_path, tiny_encoder_dir)
    rc = main(["train", "--config", str(cfg), "--set", "data.tasks=[colours, shoes]"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "task 'shoes' has no data under data.train_root" in err
    assert "task 'shoes' has no data under data.dev_root" in err


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _reap(procs) -> None:
    """SIGKILL whatever is left of the processes this test started (by pid, ours only)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.mark.integration
@pytest.mark.slow
def test_sigkilled_driver_resumes_with_same_run_name(
    ray_local, tmp_path, tiny_encoder_dir, mlflow_uri
):
    """`adrel train` drivers attached to a running cluster (--address): the first is SIGKILLed
    mid-run (Ray then ends its job), the second, same run name, continues from the checkpoint."""
    from mlflow.tracking import MlflowClient

    cfg = _config(tmp_path, tiny_encoder_dir)
    run_dir = tmp_path / "work" / "ray_results" / "resume-me"
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "jobs", "train", "--config", str(cfg), "--run-name", "resume-me"]
    cmd += ["--address", address]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_uri}
    log1 = tmp_path / "first.log"

    with log1.open("w") as out:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        started = []
        try:
            # Kill once Ray Train has registered a checkpoint (training is a few steps past it).
            while time.time() < deadline and first.poll() is None:
                started = _descendants(first.pid) or started
                if registered_checkpoints(run_dir):
                    break
                time.sleep(0.05)
            assert first.poll() is None, (
                "the first run ended before it could be killed:\n" + log1.read_text()[-3000:]
            )
            started = _descendants(first.pid)
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            first.kill() if first.poll() is None else None
            _reap(started)
    assert first.returncode == -signal.SIGKILL
    # What a kill between a checkpoint's upload and its registration leaves in storage.
    plant_stale_upload(run_dir)

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    out = second.stdout + second.stderr
    (tmp_path / "second.log").write_text(out)
    assert second.returncode == 0, out[-4000:]
    summary = re.search(r"run: resume-me \((\d+) steps, .*, resumed from step (\d+)\)", out)
    assert summary, out[-4000:]
    assert int(summary.group(1)) == 80
    resumed = int(summary.group(2))
    assert 10 <= resumed < 80 and resumed % 10 == 0
    run_id = re.search(r"MLFLOW_RUN_ID=(\w+)", out).group(1)
    ckpt = re.search(r"CHECKPOINT=(\S+)", out).group(1)
    assert Path(ckpt).parent == run_dir and (Path(ckpt) / "config.json").is_file()
    # Storage holds what Ray Train registered and kept (checkpoint.keep, 3), none of what the
    # killed driver's job uploaded without registering, and every kept folder is still there.
    left = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert left == sorted(registered_checkpoints(run_dir)) and len(left) == 3, left
    assert Path(ckpt).name in left and STALE_UPLOAD not in left
    # The planted folder, and any the kill really left between upload and registration.
    removed = re.search(
        r"run resume-me: removed (\d+) checkpoint\(s\) left by a failed attempt", out
    )
    assert removed and int(removed.group(1)) >= 1, out[-4000:]

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("cli-test").experiment_id],
        "tags.`adrel.run_name` = 'resume-me'",
    )
    assert [r.info.run_id for r in runs] == [run_id]  # the killed run's MLflow run, continued
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["adrel.resumed_from_step"] == str(
        resumed
    )
    hist = sorted(
        (m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, "train/loss")
    )
    steps = [s for s, _, _ in hist]
    assert set(steps) == set(range(5, 81, 5))
    assert all(steps.count(s) == 1 for s in steps if s <= resumed)  # no step before it repeated
    # Steps the killed driver ran past its checkpoint were trained again from the same state
    # (weights, optimizer, sampler and RNG): the loss continues exactly where it was.
    for s in set(steps):
        values = [v for st, _, v in hist if st == s]
        assert max(values) - min(values) < 1e-5, (s, values)
