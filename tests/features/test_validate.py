"""Validation and quarantine: the contract round trip, every reason, conservation, threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from features.validate import (
    REASONS,
    ThresholdExceeded,
    ValidationConfig,
    validate_batch,
    validate_dir,
    validate_table,
)
from models.config import ConfigError
from tests.features.crafted import bad_utf8, corrupt_row_group, good_rows, reason_files, write


def read_dir(path) -> pa.Table:
    files = sorted(path.rglob("*.parquet"))
    return (
        pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
        if files
        else None
    )


def quarantine_rows(out) -> int:
    return sum(pq.read_metadata(f).num_rows for f in (out / "quarantine").glob("*.parquet"))


def clean_rows(out) -> int:
    return sum(pq.read_metadata(f).num_rows for f in (out / "clean").rglob("*.parquet"))


def test_contract_round_trip(tmp_path):
    src = tmp_path / "in"
    write(src / "task=shop/part-0.parquet", good_rows(20, "a"), row_group_size=7)
    write(src / "task=shop/part-1.parquet", good_rows(5, "b"))
    write(src / "task=brand_safety/p.parquet", good_rows(8, "c"))
    report = validate_dir(src, tmp_path / "out")
    assert (report.rows_in, report.rows_clean, report.rows_quarantined) == (33, 33, 0)
    assert not report.over_threshold and report.message.startswith("ok")
    assert list((tmp_path / "out/quarantine").iterdir()) == []
    for task, parts in (("shop", ("a", "b")), ("brand_safety", ("c",))):
        clean = read_dir(tmp_path / "out/clean" / f"task={task}")
        expected = pa.concat_tables(
            [pq.read_table(f) for f in sorted((src / f"task={task}").glob("*.parquet"))]
        )
        assert clean.schema.field("label").type == pa.int8()
        assert "task" not in clean.column_names  # the partition holds it
        for col in expected.column_names:  # every column, the extra one included, unchanged
            assert clean.column(col).to_pylist() == expected.column(col).to_pylist(), col
        assert {q[0] for q in clean.column("query").to_pylist()} == set(parts)
    whole = pq.read_table(tmp_path / "out/clean")  # reads as one Hive-partitioned dataset
    assert whole.num_rows == 33 and set(whole.column("task").to_pylist()) == {
        "shop",
        "brand_safety",
    }
    saved = json.loads((tmp_path / "out/report.json").read_text())
    assert saved["rows_clean"] == 33 and saved["per_task"]["shop"]["clean"] == 25


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    expected = reason_files(root / "in")
    cfg = ValidationConfig(known_tasks=("shop", "brand"), max_text_chars=50, max_bad_fraction=1.0)
    report = validate_dir(root / "in", root / "out", cfg)
    return root, expected, report


def test_every_reason_is_crafted(crafted):
    _, expected, report = crafted
    assert set(expected) == set(REASONS)
    assert report.rows_in == report.rows_clean + report.rows_quarantined


@pytest.mark.parametrize("reason", REASONS)
def test_quarantine_reason(crafted, reason):
    root, expected, report = crafted
    rel, n_bad = expected[reason]
    assert report.per_reason.get(reason) == n_bad, report.table()
    if reason == "unreadable_file":
        # Counted from the footer, reported by path; the readable row group is validated.
        assert report.rows_unreadable == n_bad
        assert any(
            b.path == rel and b.reason == reason and b.rows == n_bad for b in report.bad_files
        )
        return
    q = read_dir(root / "out/quarantine")
    mine = q.filter(pa.compute.equal(q.column("source_file"), rel))
    assert mine.num_rows == n_bad
    assert set(mine.column("reason").to_pylist()) == {reason}
    assert {"query", "reason", "source_file", "task"} <= set(mine.column_names)
    if reason in ("schema_mismatch", "missing_column", "invalid_task_name"):
        assert any(b.path == rel and b.reason == reason for b in report.bad_files)


def test_quarantine_keeps_original_values(crafted):
    root, _, _ = crafted
    q = read_dir(root / "out/quarantine")
    rows = {r["reason"]: r for r in q.to_pylist()}
    assert rows["label_not_binary"]["label"] == "2"  # stored as text, value kept
    assert rows["empty_query"]["query"] == " \t\n "
    assert rows["schema_mismatch"]["label"] in ("yes", "no")
    assert rows["invalid_utf8"]["query"] == "caf\\xe9 shoes"  # readable, byte kept as an escape
    assert rows["task_mismatch"]["task"] == "brand"
    assert rows["invalid_task_name"]["task"] == ".."


def test_injected_task_name_is_refused(crafted):
    root, _, report = crafted
    clean_dirs = sorted(p.name for p in (root / "out/clean").iterdir())
    assert clean_dirs == ["task=brand", "task=shop"]  # no task=.. / task=other written as valid
    assert not (root / "out/x").exists() and not (root / "x").exists()
    assert ".." in report.per_task and report.per_task[".."].clean == 0


def test_conservation_with_corrupt_and_foreign_files(tmp_path):
    src = tmp_path / "in"
    write(src / "task=a/good.parquet", good_rows(40, "g"), row_group_size=10)
    mixed = good_rows(10, "m")
    mixed["query"][3] = None
    mixed["ad_title"][5] = "  "
    mixed["label"] = pa.array([0, 1, 2, 1, 0, 1, 0, 1, 0, 1], pa.int8())
    write(src / "task=a/mixed.parquet", mixed)
    corrupt = write(src / "task=b/corrupt.parquet", good_rows(30, "c"), row_group_size=10)
    corrupt_row_group(corrupt, 1)
    (src / "task=b/notes.parquet").write_bytes(b"this is not parquet")
    truncated = write(src / "task=b/truncated.parquet", good_rows(10, "t"))
    truncated.write_bytes(truncated.read_bytes()[:-30])
    write(src / "stray.parquet", good_rows(4, "s"))  # outside any task directory
    write(src / "task=a/_SUCCESS", {"x": [1]})  # marker files are not data
    write(src / "task=a/reserved.parquet", {**good_rows(3, "r"), "reason": ["x", None, "y"]})

    report = validate_dir(src, tmp_path / "out", ValidationConfig(max_bad_fraction=1.0))
    out = tmp_path / "out"
    assert report.rows_in == 40 + 10 + 30 + 4 + 3  # footers of unreadable-size files are lost
    assert report.rows_in == report.rows_clean + report.rows_quarantined
    assert report.rows_clean == clean_rows(out) == 40 + 7 + 20
    assert report.rows_quarantined == quarantine_rows(out) + report.rows_unreadable
    assert report.rows_unreadable == 10
    assert report.per_reason == {
        "null_query": 1, "empty_ad_title": 1, "label_not_binary": 1,
        "unreadable_file": 10, "invalid_task_name": 4, "reserved_column": 3,
    }  # fmt: skip
    # The file with a `reason` column of its own: refused, its values kept as input_reason.
    q = pa.concat_tables(
        [pq.read_table(f) for f in (out / "quarantine").glob("*.parquet")],
        promote_options="default",
    )
    mine = q.filter(pc.equal(q.column("reason"), "reserved_column"))
    assert mine.column("input_reason").to_pylist() == ["x", None, "y"]
    unknown = {b.path for b in report.bad_files if b.rows is None}
    assert unknown == {"task=b/notes.parquet", "task=b/truncated.parquet"}
    assert "2 unreadable file(s) of unknown size" in report.message
    assert report.over_threshold and report.message.startswith("refused")  # even at 1.0
    table = report.table()
    assert "task=b/notes.parquet" in table and "TOTAL" in table


def test_unopenable_file_refuses_the_data(tmp_path, capsys):
    # Its rows are neither clean nor quarantined: no threshold can account for them.
    src = tmp_path / "in"
    rows = good_rows(10, "g")
    rows["query"][4] = "  "  # a per-row problem, quarantined as before
    write(src / "task=x/a.parquet", rows)
    (src / "task=x/zz.parquet").write_bytes(b"\x00junk, not parquet\xff" * 8)
    cfg = ValidationConfig(max_bad_fraction=1.0)
    report = validate_dir(src, tmp_path / "out", cfg)
    assert report.over_threshold and report.message.startswith("refused")
    assert "1 unreadable file(s) of unknown size, so their rows cannot be accounted for" in (
        report.message
    )
    assert "task=x/zz.parquet (ArrowInvalid: " in report.message  # the file and the reason
    with pytest.raises(ThresholdExceeded, match="task=x/zz.parquet"):
        report.check()
    saved = json.loads((tmp_path / "out/report.json").read_text())
    assert saved["over_threshold"] and saved["message"].startswith("refused")
    assert (report.rows_in, report.rows_clean, report.rows_quarantined) == (10, 9, 1)
    assert clean_rows(tmp_path / "out") == 9 and quarantine_rows(tmp_path / "out") == 1

    from jobs.cli import main

    args = ["data", "validate", "--input", str(src), "--max-bad-fraction", "1"]
    assert main([*args, "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "task=x/zz.parquet" in err
    (src / "task=x/zz.parquet").unlink()
    assert main([*args, "--out", str(tmp_path / "out3")]) == 0


def test_dtype_drift_is_normalised(tmp_path):
    src = tmp_path / "in"
    a = good_rows(6, "a")
    a["query_id"] = list(range(6))  # int ids
    a["label"] = pa.array([True, False] * 3)  # bool labels
    write(src / "task=t/a.parquet", a)
    b = good_rows(6, "b")
    b["query"] = pa.array(b["query"], pa.large_string())
    b["ad_title"] = pa.array(b["ad_title"]).dictionary_encode()
    b["label"] = pa.array([1.0, 0.0] * 3)  # float labels
    b["grade"] = pa.array([1, 2, 3, 0, 1, 2], pa.int64())
    b["ad_id"] = pa.array(range(6), pa.int32())
    write(src / "task=t/b.parquet", b)
    c = good_rows(6, "c")
    c["label"] = pa.array(["1", "0"] * 3)  # numbers stored as strings
    c["query"] = pa.array([q.encode() for q in c["query"]], pa.binary())
    write(src / "task=t/c.parquet", c)

    report = validate_dir(src, tmp_path / "out")
    assert report.rows_quarantined == 0, report.table()
    clean = pq.read_table(tmp_path / "out/clean/task=t")  # the files read together
    assert clean.num_rows == 18
    types = {f.name: f.type for f in clean.schema}
    assert types["query_id"] == pa.string() and types["ad_id"] == pa.string()
    assert types["label"] == pa.int8() and types["grade"] == pa.float32()
    assert types["query"] == pa.string() and types["ad_title"] == pa.string()
    assert sorted(clean.column("query_id").to_pylist())[:2] == ["0", "1"]
    assert sorted(set(clean.column("label").to_pylist())) == [0, 1]


def test_threshold_refuses_but_writes_outputs(tmp_path):
    src = tmp_path / "in"
    rows = good_rows(50, "g")
    rows["query"][0] = ""
    write(src / "task=a/p.parquet", rows)
    report = validate_dir(src, tmp_path / "out", ValidationConfig(max_bad_fraction=0.01))
    assert report.over_threshold and report.message.startswith("refused")
    assert "1 of 50 rows quarantined (2.00%, max 1.00%)" in report.message
    with pytest.raises(ThresholdExceeded, match="refused"):
        report.check()
    assert clean_rows(tmp_path / "out") == 49 and quarantine_rows(tmp_path / "out") == 1
    ok = validate_dir(src, tmp_path / "out2", ValidationConfig(max_bad_fraction=0.05))
    assert not ok.over_threshold and ok.check() is ok


def test_output_dir_guards(tmp_path):
    src = tmp_path / "in"
    write(src / "task=a/p.parquet", good_rows(3))
    with pytest.raises(ValueError, match="inside"):
        validate_dir(src, src / "out")
    validate_dir(src, tmp_path / "out")
    with pytest.raises(ValueError, match="not empty"):
        validate_dir(src, tmp_path / "out")
    assert validate_dir(src, tmp_path / "out", overwrite=True).rows_clean == 3
    # The result is published in one piece: nothing is left beside it, and --overwrite never
    # deletes what is not a validation result.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\], which is not part of"):
        validate_dir(src, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="no data files"):
        validate_dir(tmp_path / "out/quarantine", tmp_path / "o3")


def test_scoring_input_needs_no_label(tmp_path):
    src = tmp_path / "in"
    rows = good_rows(4)
    del rows["label"], rows["grade"]
    write(src / "task=a/p.parquet", rows)
    assert validate_dir(src, tmp_path / "o1").per_reason == {"missing_column": 4}
    report = validate_dir(src, tmp_path / "o2", ValidationConfig(require_label=False))
    assert (
        report.rows_clean == 4 and "label" not in pq.read_table(tmp_path / "o2/clean").column_names
    )


def test_validate_batch_on_numpy_dict():
    batch = {
        "query": np.array(["red shoes", "  ", None, b"caf\xe9", "boots"], dtype=object),
        "ad_title": np.array(["t1", "t2", "t3", "t4", "t5"], dtype=object),
        "label": np.array([1, 0, 1, 0, 3]),
        "extra": np.arange(5),
        "tokens": np.zeros((5, 4), dtype=np.int64),  # non-contract 2-D columns ride along
    }
    good, bad = validate_batch(batch, ValidationConfig(), task="shop")
    assert good["query"].tolist() == ["red shoes"]
    assert good["task"].tolist() == ["shop"] and good["tokens"].shape == (1, 4)
    assert bad["reason"].tolist() == [
        "empty_query",
        "null_query",
        "invalid_utf8",
        "label_not_binary",
    ]
    assert bad["extra"].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="task"):
        validate_batch(
            {"query": np.array(["a"]), "ad_title": np.array(["b"]), "label": np.array([1])},
            ValidationConfig(),
        )


def test_a_table_with_its_own_reason_column_is_refused_by_name():
    table = pa.table({"query": ["a"], "ad_title": ["b"], "label": [1], "reason": ["mine"]})
    with pytest.raises(ValueError, match="a column named 'reason', the one this check adds"):
        validate_table(table, ValidationConfig(), task="t")


def test_validate_table_reports_schema_mismatch():
    table = pa.table({"query": [1.5], "ad_title": [["a"]], "label": [1]})
    good, bad = validate_table(table, ValidationConfig(), task="t")
    assert good.num_rows == 0 and bad.column("reason").to_pylist() == ["schema_mismatch"]
    table = pa.table({"query": ["a"], "ad_title": ["b"], "label": [1], "task": ["t"]})
    good, bad = validate_table(table, ValidationConfig())
    assert good.num_rows == 1 and bad.num_rows == 0


def test_invalid_utf8_in_description_and_ids():
    table = pa.table(
        {
            "query": ["a", "b", "c"],
            "ad_title": ["t", "t", "t"],
            "ad_description": pa.concat_arrays([pa.array(["ok", None]), bad_utf8(b"\xff")]),
            "label": [1, 0, 1],
        }
    )
    good, bad = validate_table(table, ValidationConfig(), task="t")
    assert good.num_rows == 2 and bad.column("reason").to_pylist() == ["invalid_utf8"]


def test_config_errors_are_listed_together():
    with pytest.raises(ConfigError) as e:
        ValidationConfig(max_text_chars=0, max_bad_fraction=2.0, known_tasks=["ok", "../x"])
    assert len(e.value.errors) == 3
    assert ValidationConfig(known_tasks=["a", "b"]).known_tasks == ("a", "b")


RELBENCH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "relbench"


@pytest.mark.skipif(
    not (RELBENCH / "dev").is_dir(),
    reason=f"relbench data not found at {RELBENCH} (it lives beside the repository, never in it)",
)
def test_relbench_dev_validates(tmp_path):
    from pipeline.ingest import plan_read

    report = validate_dir(RELBENCH / "dev", tmp_path / "out")
    assert report.rows_in > 10_000 and not report.over_threshold
    assert report.rows_in == report.rows_clean + report.rows_quarantined
    assert set(report.per_task) == {p.name[len("task=") :] for p in (RELBENCH / "dev").iterdir()}
    plan = plan_read(RELBENCH / "dev")  # consistent task columns: every file read by Ray
    assert plan.driver_files == [] and len(plan.ray_files) == len(report.per_task)
