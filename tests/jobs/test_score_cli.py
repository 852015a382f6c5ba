"""`adrel score`: the command, its exit codes, registry URIs, and a SIGKILL midway."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.cli import main
from tests.pipeline.test_batch_score import (
    TASKS,
    make_tiny_export,
    read_quarantine,
    read_scored,
    staging_dirs,
    synth_inventory,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_encoder_dir):
    return make_tiny_export(tmp_path_factory.getbasetemp(), tiny_encoder_dir)


def score(*args: str) -> int:
    return main(["score", "--progress-every", "0", *map(str, args)])


def test_bad_input_is_refused_before_a_cluster_starts(export_dir, tmp_path, monkeypatch, capsys):
    import jobs.runtime

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started for input that was refused")

    monkeypatch.setattr(jobs.runtime, "ensure_ray", no_cluster)
    inv = synth_inventory(tmp_path / "inv", 10, tasks=("exact_match", "brand_protect"))
    cases = [
        (["--input", tmp_path / "nope"], "no input directory"),
        (["--input", inv, "--tasks", "../x"], "../x"),
        (["--input", inv, "--output", inv / "out"], "inside"),
        (["--input", inv, "--tasks", "shopping"], "shopping"),
    ]
    for extra, text in cases:
        argv = ["--model", export_dir, "--output", tmp_path / "o", *extra]
        assert score(*argv) == 2, extra
        assert text in capsys.readouterr().err, extra
    for option, field in (("--progress-every", "progress_every_s"),
                          ("--gpus-per-actor", "num_gpus_per_actor")):  # fmt: skip
        for value in ("nan", "inf"):
            assert score("--model", export_dir, "--input", inv, "--output", tmp_path / "o",
                         option, value) == 2  # fmt: skip
            err = capsys.readouterr().err
            assert f"{field} must be" in err and value in err, err
    assert not (tmp_path / "o").exists()


def test_cli_scores_refuses_a_rerun_and_overwrites(export_dir, tmp_path, ray_local, capsys):
    inv = synth_inventory(tmp_path / "inv", 30)
    out = tmp_path / "scores"
    base = ("--model", export_dir, "--input", inv, "--output", out, "--batch-size", "16")
    assert score(*base) == 0
    text = capsys.readouterr().out
    assert "scored 60/60 rows (100%)" in text
    for task in TASKS:
        assert any(line.startswith(task) and " ok " in line for line in text.splitlines())
    assert "rows/s" in text and f"output: {out.resolve()}" in text
    assert read_scored(out, "exact_match").num_rows == 30

    assert score(*base) == 2
    assert "exists" in capsys.readouterr().err
    assert score(*base, "--overwrite", "--actors", "2") == 0
    assert sum(read_scored(out, t).num_rows for t in TASKS) == 60


def test_cli_task_without_model_is_a_user_error(export_dir, tmp_path, ray_local, capsys):
    inv = synth_inventory(tmp_path / "inv", 10, tasks=("exact_match", "brand_protect"))
    out = tmp_path / "scores"
    assert score("--model", export_dir, "--input", inv, "--output", out) == 2
    err = capsys.readouterr().err
    assert "brand_protect" in err and "no model" in err
    assert not out.exists() and not staging_dirs(out)


def _register(export_dir: Path, uri: str, alias: str = "champion") -> None:
    """Each task folder as a registered task model `adrel-<task>` carrying `alias`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    from pipeline.tracking import artifact_location

    exp = client.create_experiment("score-cli-test", artifact_location=artifact_location(uri))
    with mlflow.start_run(experiment_id=exp) as run:
        for task in TASKS:
            mlflow.log_artifacts(str(export_dir / task), artifact_path=f"export/{task}")
    for task in TASKS:
        name = f"adrel-{task}"
        client.create_registered_model(name, tags={"adrel.kind": "task", "adrel.task": task})
        mv = client.create_model_version(
            name, f"{run.info.artifact_uri}/export/{task}", run_id=run.info.run_id
        )
        client.set_registered_model_alias(name, alias, mv.version)


def test_cli_scores_with_registry_aliases(
    export_dir, tmp_path, ray_local, mlflow_uri, monkeypatch, capsys
):
    monkeypatch.setenv("ADREL_MODEL_CACHE", str(tmp_path / "model-cache"))
    monkeypatch.chdir(tmp_path)  # the run's local artifact store lands under tmp
    _register(export_dir, mlflow_uri)
    inv = synth_inventory(tmp_path / "inv", 20)
    out = tmp_path / "all"
    assert score("--model", "models:/adrel@champion", "--input", inv, "--output", out) == 0
    for task in TASKS:
        got = read_scored(out, task)
        assert set(got.column("model_name").to_pylist()) == {f"adrel-{task}"}
        assert set(got.column("model_version").to_pylist()) == {"1"}
    one = tmp_path / "one"
    args = ("--model", "models:/adrel-exact_match@champion", "--input", inv, "--output", one)
    assert score(*args) == 2  # broad_match rows have no model under that URI
    assert "broad_match" in capsys.readouterr().err
    assert score(*args, "--tasks", "exact_match") == 0
    assert read_scored(one, "exact_match").num_rows == 20


# ---------------------------------------------------------------------------------------------
# A run killed midway


def _session_members(sid: int) -> list[int]:
    """Pids of live (non-zombie) processes in session `sid` (Ray's processes stay in it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(d.name))
    return pids


def _start_until_staged(cmd: list[str], out: Path, log: Path, tries: int = 3) -> subprocess.Popen:
    """Start `adrel score` in its own session; return once it has staged scored files.

    A start that fails because the local Ray did not come up (an overloaded machine) is
    retried; any other early exit fails the test.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for _ in range(tries):
        with open(log, "wb") as f:  # a file, not a pipe: a full pipe would stall the run
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: Ray's processes join it
            )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(any(d.glob("task=*/*.parquet")) for d in staging_dirs(out)):
                return proc  # scored files are staged: the run is midway
            if proc.poll() is not None:
                err = log.read_text(errors="replace")
                if "timed out during startup" in err:
                    break  # Ray itself did not start: try again
                pytest.fail(f"adrel score ended before it was killed: {err[-2000:]}")
            time.sleep(0.02)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("adrel score staged nothing within 300 s")
    pytest.fail(f"the local Ray of adrel score did not start in {tries} tries")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigterm_midway_stops_cleanly(export_dir, tmp_path):
    """SIGTERM (what a scheduler or container runtime sends) stops the run as Ctrl-C does:
    its own message and exit code, nothing published, no staging, the local Ray shut down."""
    inv = synth_inventory(tmp_path / "inv", 1500)
    out = tmp_path / "scores"
    args = ["--model", export_dir, "--input", inv, "--output", out, "--block-rows", "8"]
    cmd = [sys.executable, "-m", "jobs", "score", "--num-cpus", "2", *map(str, args)]
    log = tmp_path / "terminated-run.log"
    proc = _start_until_staged(cmd, out, log)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
        for _ in range(100):  # Ray's processes take a moment to go
            if not _session_members(proc.pid):
                break
            time.sleep(0.1)
        assert not _session_members(proc.pid), "Ray processes outlived the run"
    finally:
        for pid in _session_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert "adrel score: terminated (SIGTERM)" in text and "SIGTERM received" not in text
    assert not out.exists() and not staging_dirs(out)


def test_sigkill_midway_leaves_no_visible_output_and_rerun_completes(
    export_dir, tmp_path, ray_local, capsys
):
    inv = synth_inventory(tmp_path / "inv", 1500)
    out = tmp_path / "scores"
    args = ["--model", export_dir, "--input", inv, "--output", out, "--block-rows", "8"]
    cmd = [sys.executable, "-m", "jobs", "score", "--num-cpus", "2", *map(str, args)]
    proc = _start_until_staged(cmd, out, tmp_path / "killed-run.log")
    try:
        # the whole job dies at once, as when its container or node goes: every process of
        # the session (Ray starts some of them in process groups of their own)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for _ in range(100):  # killed processes take a moment to be reaped
            left = _session_members(proc.pid)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        assert not left, f"processes of the killed run still alive: {left}"
    finally:
        for pid in _session_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    assert not out.exists(), "a killed run must not publish anything"
    (stage,) = staging_dirs(out)
    assert stage.name.startswith(".")  # hidden from listings and from data readers

    assert score(*args) == 0  # the re-run completes and removes the dead run's staging
    assert "removed the staging directory of a killed run" in capsys.readouterr().out
    assert not staging_dirs(out)
    for task in TASKS:
        assert read_scored(out, task).num_rows == 1500
    assert not read_quarantine(out)
