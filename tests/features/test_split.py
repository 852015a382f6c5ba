"""Deterministic split by query hash: stable, proportional, no query in two splits."""

from __future__ import annotations

import os
import re

import pyarrow.parquet as pq
import pytest

from features.split import check_fractions, split_dir, split_of
from tests.features.crafted import good_rows, write


def test_split_of_is_stable_and_case_insensitive():
    assert split_of("Red Running Shoes") == split_of("  red   running shoes ")
    assert [split_of(f"query {i}") for i in range(50)] == [
        split_of(f"query {i}") for i in range(50)
    ]
    assert split_of("anything", (1.0, 0.0, 0.0)) == "train"
    assert split_of("anything", (0.0, 0.0, 1.0)) == "test"


def test_split_fractions_are_respected():
    names = [split_of(f"q-{i}", (0.7, 0.2, 0.1)) for i in range(6000)]
    share = {s: names.count(s) / len(names) for s in ("train", "dev", "test")}
    assert abs(share["train"] - 0.7) < 0.03 and abs(share["dev"] - 0.2) < 0.03
    assert abs(share["test"] - 0.1) < 0.03


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.8, 0.3, 0.1), (-0.1, 0.6, 0.5), ("a", 1, 0)])
def test_bad_fractions_are_refused(bad):
    with pytest.raises(ValueError, match="fractions"):
        check_fractions(bad)


def test_split_dir_keeps_each_query_in_one_split(tmp_path):
    src = tmp_path / "in"
    rows = good_rows(300, "q")
    rows["query"] = [f"query {i % 60}" if i % 2 else f"QUERY {i % 60}" for i in range(300)]
    write(src / "task=a/p0.parquet", rows)
    write(src / "task=b/p0.parquet", good_rows(40, "z"))
    counts = split_dir(src, tmp_path / "out", (0.6, 0.2, 0.2))
    assert sum(n for per_task in counts.values() for n in per_task.values()) == 340
    seen: dict[str, str] = {}
    for split in ("train", "dev", "test"):
        for f in (tmp_path / "out" / split).rglob("*.parquet"):
            table = pq.read_table(f, partitioning=None)
            assert table.column_names == list(rows)  # source columns and types kept
            for q in table.column("query").to_pylist():
                key = q.lower()
                assert seen.setdefault(key, split) == split, f"{q!r} in two splits"
    assert len({s for s in seen.values()}) == 3


def test_split_dir_refuses_invalid_task_dirs(tmp_path):
    write(tmp_path / "in/task=../x/p.parquet", good_rows(2))
    with pytest.raises(ValueError, match="task"):
        split_dir(tmp_path / "in", tmp_path / "out")


@pytest.mark.parametrize(
    "bad, named",
    [((float("nan"), 0.5, 0.5), "train=nan"), ((0.5, 0.5, float("inf")), "test=inf")],
)
def test_non_finite_fractions_are_refused(bad, named):
    with pytest.raises(ValueError, match=f"finite.*{named}"):
        check_fractions(bad)


def _split_rows(root) -> dict[str, int]:
    return {
        split: sum(pq.read_metadata(f).num_rows for f in (root / split).rglob("*.parquet"))
        for split in ("train", "dev", "test")
    }


def test_split_dir_refuses_a_non_empty_out_and_overwrite_replaces_it_whole(tmp_path):
    write(tmp_path / "in/task=a/p0.parquet", good_rows(200))
    out = tmp_path / "out"
    split_dir(tmp_path / "in", out, (0.5, 0.0, 0.5))
    before = _split_rows(out)
    assert before["train"] and before["test"]
    with pytest.raises(ValueError, match=re.escape(f"--out {out} is not empty") + ".*--overwrite"):
        split_dir(tmp_path / "in", out, (1.0, 0.0, 0.0))
    assert _split_rows(out) == before  # refused: nothing touched
    split_dir(tmp_path / "in", out, (1.0, 0.0, 0.0), overwrite=True)
    assert _split_rows(out) == {"train": 200, "dev": 0, "test": 0}  # no old test rows left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no staging left


def test_split_dir_failing_part_way_leaves_out_as_it_was(tmp_path):
    write(tmp_path / "in/task=a/p0.parquet", good_rows(50))
    (tmp_path / "in/task=a/p1.parquet").write_bytes(b"not parquet")  # read after p0 is split
    with pytest.raises(ValueError, match=r"p1\.parquet"):
        split_dir(tmp_path / "in", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    write(tmp_path / "ok/task=a/p0.parquet", good_rows(30, "z"))
    split_dir(tmp_path / "ok", tmp_path / "old")
    before = _split_rows(tmp_path / "old")
    with pytest.raises(ValueError, match=r"p1\.parquet"):
        split_dir(tmp_path / "in", tmp_path / "old", overwrite=True)
    assert _split_rows(tmp_path / "old") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "ok", "old"]  # no staging left


def test_split_dir_overwrite_replaces_only_a_split(tmp_path):
    write(tmp_path / "in/task=a/p0.parquet", good_rows(10))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt.*not part of a split"):
        split_dir(tmp_path / "in", tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"
    # The input inside the output would be replaced with it.
    with pytest.raises(ValueError, match="--input .* is inside --out"):
        split_dir(tmp_path / "in", tmp_path, overwrite=True)
    assert (tmp_path / "in/task=a/p0.parquet").is_file()


def test_split_dir_refuses_an_out_that_is_a_file(tmp_path):
    write(tmp_path / "in/task=a/p0.parquet", good_rows(10))
    (tmp_path / "f").write_text("")
    with pytest.raises(
        ValueError, match=re.escape(f"--out {tmp_path / 'f'} exists and is not a directory")
    ):
        split_dir(tmp_path / "in", tmp_path / "f")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'f'} is not a directory")):
        split_dir(tmp_path / "in", tmp_path / "f/sub")


def test_a_killed_runs_staging_is_removed_by_a_later_run_after_a_day(tmp_path):
    import time

    write(tmp_path / "in/task=a/p0.parquet", good_rows(20))
    stale = tmp_path / ".out.staging-deadbeef0000"
    (stale / "train").mkdir(parents=True)
    day_ago = time.time() - 25 * 3600
    os.utime(stale, (day_ago, day_ago))
    recent = tmp_path / ".out.staging-live00000000"  # another run, writing right now
    recent.mkdir()
    split_dir(tmp_path / "in", tmp_path / "out")
    assert not stale.exists() and recent.exists()
    assert (tmp_path / "out" / "train").is_dir()


def test_a_staging_folder_of_a_process_that_is_gone_is_removed_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write(tmp_path / "in/task=a/p0.parquet", good_rows(20))
    host = socket.gethostname()
    dead = tmp_path / f".out.staging-{host}-{gone.pid}-0000aaaa"
    dead.mkdir()
    live = tmp_path / f".out.staging-{host}-{os.getpid()}-0000bbbb"  # this process: alive
    live.mkdir()
    split_dir(tmp_path / "in", tmp_path / "out")
    assert not dead.exists() and live.exists()
