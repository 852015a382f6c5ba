"""The retrain lock (survives crashes, refuses live holders) and the stage log (resumable)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pipeline.lock import LockBusy, RunLock
from pipeline.stages import StageLog, hash_path, hash_value


def test_second_holder_is_refused_while_first_lives(tmp_path):
    path = tmp_path / "adrel.lock"
    with RunLock(path, owner="run-1"), pytest.raises(LockBusy, match=r"pid \d+ .*run-1"):
        RunLock(path, owner="run-2").acquire()
    assert not path.exists()
    with RunLock(path, owner="run-2"):  # free again after release
        assert json.loads(path.read_text())["owner"] == "run-2"


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    path = tmp_path / "adrel.lock"
    code = f"from pipeline.lock import RunLock; RunLock({str(path)!r}).acquire(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert path.exists()  # the dead process never released it
    with RunLock(path, owner="after-crash"):
        assert json.loads(path.read_text())["owner"] == "after-crash"


def test_old_lock_is_stale_after_timeout(tmp_path):
    path = tmp_path / "adrel.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": time.time() - 100}))
    with pytest.raises(LockBusy):
        RunLock(path, stale_after_s=1000).acquire()
    with RunLock(path, stale_after_s=10):
        pass


def test_stage_log_skips_done_stages_and_reruns_on_changed_inputs(tmp_path):
    calls = []
    log = StageLog(tmp_path / "state.json")
    out, ran = log.run("ingest", lambda: calls.append(1) or {"rows": 10}, inputs_hash="h1")
    assert ran and out == {"rows": 10}
    log2 = StageLog(tmp_path / "state.json")  # a fresh process reads the same file
    out, ran = log2.run("ingest", lambda: calls.append(2) or {"rows": 99}, inputs_hash="h1")
    assert not ran and out == {"rows": 10} and calls == [1]
    out, ran = log2.run("ingest", lambda: calls.append(3) or {"rows": 11}, inputs_hash="h2")
    assert ran and out == {"rows": 11}


def test_hashes_follow_content(tmp_path):
    d = tmp_path / "data"
    (d / "task=a").mkdir(parents=True)
    (d / "task=a" / "p.parquet").write_bytes(b"abc")
    h1 = hash_path(d)
    assert hash_path(d) == h1
    (d / "task=a" / "p.parquet").write_bytes(b"abd")
    assert hash_path(d) != h1
    assert hash_value({"a": 1, "b": [2]}) == hash_value({"b": [2], "a": 1})
