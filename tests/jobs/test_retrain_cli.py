"""`adrel demo` and `adrel retrain` end to end on a tiny encoder: promotion, held gates,
idempotent re-runs, the lock, and resume after a SIGKILL during training."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "jobs" / "presets" / "retrain-tiny.yaml")
EASY_GATES = ["--set", "evaluation.gates.min_roc_auc=0.0", "--set", "evaluation.gates.max_ece=1.0"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def adrel(args, env, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _env(workdir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the embedded default: sqlite under the workdir
    env.pop("RAY_ADDRESS", None)
    return env


def _client(workdir: Path):
    from mlflow import MlflowClient

    return MlflowClient("sqlite:///" + str(workdir / "mlflow.db"))


def _aliases(workdir: Path, name: str) -> dict:
    # MLflow hands versions back as int or str depending on the store: compare as strings
    return {a: str(v) for a, v in _client(workdir).get_registered_model(name).aliases.items()}


def _versions(workdir: Path, name: str) -> list[str]:
    versions = _client(workdir).search_model_versions(f"name = '{name}'")
    return sorted((str(v.version) for v in versions), key=int)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`adrel demo --preset tiny` once: the first retrain, which promotes every task."""
    work = tmp_path_factory.mktemp("demo") / "work"
    res = adrel(["demo", "--preset", "tiny", "--workdir", str(work), "--rows-per-task", "200",
                 "--inventory-rows", "60", *EASY_GATES], _env(work), work.parent)  # fmt: skip
    return work, res


def test_demo_runs_end_to_end_and_promotes_first_models(demo_run):
    work, res = demo_run
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    tasks = ("brand_protect", "broad_match", "exact_match", "shopping")
    for task in tasks:
        assert f"{task}" in res.stdout and "PROMOTED" in res.stdout
        assert _aliases(work, f"adrel-{task}") == {"challenger": "1", "champion": "1"}
    assert _aliases(work, "adrel-mtl") == {"challenger": "1", "champion": "1"}
    # Where everything is: the report, the scored inventory, the MLflow UI command.
    report = work / "retrain" / "demo-1" / "evaluation" / "report.html"
    assert report.is_file() and f"evaluation report : {report}" in res.stdout
    scored = work / "scored" / "demo-1"
    summary = json.loads((scored / "_batch_score.json").read_text())
    assert (
        summary["rows_in"] == 4 * 60
        and summary["rows_in"] == summary["rows_scored"] + summary["rows_quarantined"]
    )
    assert sorted(p.name for p in scored.glob("task=*")) == [f"task={t}" for t in tasks]
    assert "mlflow ui --backend-store-uri sqlite:///" in res.stdout
    state = json.loads((work / "retrain" / "demo-1" / "state.json").read_text())
    assert set(state["stages"]) == {
        "ingest",
        "train",
        "evaluate",
        "export",
        "register",
        "promote",
        "score",
    }


def test_failed_gates_hold_the_champion_with_exit_code_3(demo_run):
    work, first = demo_run
    assert first.returncode == 0
    roots = work / "data" / "synth"
    args = ["retrain", "--config", TINY, "--run-name", "strict", "--set", f"workdir={work}",
            "--set", f"data.train_root={roots / 'train'}", "--set", f"data.dev_root={roots / 'dev'}",
            "--set", f"data.holdout_root={roots / 'holdout'}",
            "--set", "evaluation.gates.absolute_always=true", "--set", "evaluation.gates.min_roc_auc=0.999"]  # fmt: skip
    res = adrel(args, _env(work), work.parent)
    out = res.stdout + res.stderr
    assert res.returncode == 3, out[-5000:]
    assert "HELD" in res.stdout and "PROMOTED" not in res.stdout
    for task in ("exact_match", "shopping"):
        assert _aliases(work, f"adrel-{task}") == {"challenger": "2", "champion": "1"}
    assert _aliases(work, "adrel-mtl") == {"challenger": "2", "champion": "1"}

    # A finished run re-run is a no-op: same exit code, the summary, nothing registered again.
    again = adrel(args, _env(work), work.parent, timeout=120)
    assert again.returncode == 3
    assert "already finished" in again.stdout
    assert _versions(work, "adrel-shopping") == ["1", "2"]
    assert _versions(work, "adrel-mtl") == ["1", "2"]


def test_a_second_retrain_is_refused_while_the_lock_is_held(demo_run, tmp_path):
    from pipeline.lock import RunLock

    work, _ = demo_run
    roots = work / "data" / "synth"
    with RunLock(work / "locks" / "retrain-adrel.lock", owner="nightly"):
        res = adrel(["retrain", "--config", TINY, "--set", f"workdir={work}",
                     "--set", f"data.train_root={roots / 'train'}", "--set", f"data.dev_root={roots / 'dev'}",
                     "--set", f"data.holdout_root={roots / 'holdout'}"], _env(work), work.parent, timeout=120)  # fmt: skip
    assert res.returncode == 75, res.stdout + res.stderr
    assert "another run holds" in res.stderr and "nightly" in res.stderr


def test_bad_retrain_config_lists_every_error(tmp_path):
    res = adrel(["retrain", "--config", TINY, "--set", "train.optim.lr=-1", "--set", "registry.prefix=a/b",
                 "--set", "evaluation.gates.nope=1", "--run-name", "../up"],
                _env(tmp_path), tmp_path, timeout=120)  # fmt: skip
    assert res.returncode == 2
    for needle in ("optim.lr", "registry.prefix", "unknown gate", "run_name", "'../up'"):
        assert needle in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_input_folders_are_a_config_error_before_anything_runs(tmp_path):
    work = tmp_path / "w"
    res = adrel(["retrain", "--config", TINY, "--run-name", "r1",
                 "--set", f"workdir={work}", "--set", f"data.dev_root={tmp_path / 'nodev'}",
                 "--set", f"inventory.input={tmp_path / 'noinv'}"],
                _env(tmp_path), tmp_path, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"data.dev_root: no data directory at {tmp_path / 'nodev'}" in res.stderr
    assert f"inventory.input: no inventory directory at {tmp_path / 'noinv'}" in res.stderr
    assert "resume" not in res.stderr and "Traceback" not in res.stderr
    assert not (work / "retrain" / "r1").exists()  # no run was started


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def test_sigkill_during_training_then_rerun_completes_once(tmp_path):
    import psutil

    from jobs.demo import make_data

    work = tmp_path / "work"
    roots = make_data(work, rows_per_task=160, inventory_rows=20)
    args = ["retrain", "--config", TINY, "--run-name", "crashy", "--set", f"workdir={work}",
            "--set", f"data.train_root={roots['train']}", "--set", f"data.dev_root={roots['dev']}",
            "--set", f"data.holdout_root={roots['holdout']}", "--set", "train.optim.max_steps=60",
            *EASY_GATES]  # fmt: skip
    env = _env(work)
    ckpts = work / "ray_results" / "crashy-train"
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([sys.executable, "-m", "jobs", *args], cwd=tmp_path, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        started: list = []
        try:
            deadline = time.time() + 500
            while time.time() < deadline and first.poll() is None:
                started = _descendants(first.pid) or started
                # Killed once Ray Train has recorded step 20's checkpoint in its snapshot
                # (what a rerun resumes from), not as soon as the folder appears: a kill
                # between the two left nothing to resume from.
                if "checkpoint-0000020" in _read(ckpts / "checkpoint_manager_snapshot.json"):
                    break
                time.sleep(0.1)
            assert first.poll() is None, (
                "finished before it could be killed:\n" + log.read_text()[-3000:]
            )
            started = _descendants(first.pid)
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
            _, alive = psutil.wait_procs(started, timeout=15)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
    state = json.loads((work / "retrain" / "crashy" / "state.json").read_text())
    assert set(state["stages"]) == {"ingest"}  # killed inside training
    second = adrel(args, env, tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    assert "resuming run crashy: stages done ['ingest']" in out
    assert "resuming run crashy-train from step" in out  # training continued from its checkpoint
    assert _versions(work, "adrel-mtl") == ["1"]
    for task in ("brand_protect", "broad_match", "exact_match", "shopping"):
        assert _versions(work, f"adrel-{task}") == ["1"]
    # The killed attempt's checkpoint staging folder was cleared by the resumed run.
    left = [
        c.parent.parent.name
        for c in Path(tempfile.gettempdir()).glob("adrel-ckpt-*/*/config.json")
        if str(work) in c.read_text()
    ]
    assert left == [], left
