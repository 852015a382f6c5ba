"""The contract schema: type normalisation, mismatch reporting, layout discovery."""

from __future__ import annotations

import pyarrow as pa
import pytest

from features.schema import (
    READ_TYPES,
    REQUIRED_COLUMNS,
    TEXT_COLUMNS,
    SchemaMismatch,
    discover,
    list_tasks,
    normalize_table,
    read_schema,
    scan_castable,
    to_clean,
)
from tests.features.crafted import good_rows, write


def test_contract_constants():
    assert REQUIRED_COLUMNS == ("query", "ad_title")
    assert TEXT_COLUMNS == ("query", "ad_title", "ad_description")
    assert READ_TYPES["label"] == pa.float64()


def test_normalize_accepts_drift_and_keeps_extras():
    extra = pa.array(["x", "y", "x"]).dictionary_encode()
    table = pa.table(
        {
            "query": pa.array(["a", "b", "c"], pa.large_string()),
            "ad_title": pa.array(["t", "u", "t"]).dictionary_encode(),
            "ad_description": pa.nulls(3),
            "query_id": pa.array([1, 2, 3], pa.int64()),
            "ad_id": pa.array([b"a1", b"a2", b"a3"], pa.binary()),
            "label": pa.array([True, False, True]),
            "grade": pa.array([1, 2, 3], pa.int16()),
            "weight": pa.array(["1.5", " 2", "1"]),
            "campaign": extra,
        }
    )
    out = normalize_table(table)
    for name, t in READ_TYPES.items():
        if name in out.column_names:
            assert out.schema.field(name).type == t, name
    assert out.column("query_id").to_pylist() == ["1", "2", "3"]
    assert out.column("ad_id").to_pylist() == ["a1", "a2", "a3"]
    assert out.column("label").to_pylist() == [1.0, 0.0, 1.0]
    assert out.column("weight").to_pylist() == [1.5, 2.0, 1.0]
    assert out.column("ad_title").to_pylist() == ["t", "u", "t"]
    assert out.column("campaign").type == extra.type  # extra columns untouched
    assert out.column_names == table.column_names
    assert to_clean(out).schema.field("label").type == pa.int8()


def test_normalize_lists_every_bad_column():
    table = pa.table({"query": [1.5], "ad_title": [["a"]], "label": ["yes"], "grade": [1.0]})
    with pytest.raises(SchemaMismatch) as e:
        normalize_table(table)
    assert set(e.value.problems) == {"query", "ad_title", "label"}
    assert "yes" in e.value.problems["label"]


def test_scan_castable_sends_values_that_need_checks_elsewhere():
    assert scan_castable("query", pa.large_string())
    assert scan_castable("query_id", pa.int32())
    assert scan_castable("ad_title", pa.dictionary(pa.int32(), pa.string()))
    assert not scan_castable("query", pa.binary())  # utf-8 unknown until rows are read
    assert not scan_castable("label", pa.string())  # may not parse
    assert scan_castable("anything_else", pa.list_(pa.int8()))


def test_read_schema_unifies_extras_and_drops_conflicts():
    s1 = pa.schema([("query", pa.large_string()), ("n", pa.int32()), ("c", pa.string())])
    s2 = pa.schema([("query", pa.string()), ("n", pa.int64()), ("c", pa.list_(pa.int8()))])
    schema, dropped = read_schema([s1, s2])
    assert schema.field("query").type == pa.string()
    assert schema.field("label").type == pa.float64()  # every contract column, null if absent
    assert schema.field("n").type == pa.int64()
    assert dropped == ["c"]


def test_discover_flags_bad_directories(tmp_path):
    write(tmp_path / "task=a/p0.parquet", good_rows(1))
    write(tmp_path / "task=a/sub/p1.parquet", good_rows(1))
    write(tmp_path / "task=b/p.parquet", good_rows(1))
    write(tmp_path / "task=../x/p.parquet", good_rows(1))
    write(tmp_path / "task=a b/p.parquet", good_rows(1))
    write(tmp_path / "task=%2E%2E/p.parquet", good_rows(1))
    write(tmp_path / "other/p.parquet", good_rows(1))
    write(tmp_path / "task=a/.hidden.parquet", good_rows(1))
    write(tmp_path / "_temporary/p.parquet", good_rows(1))
    found = {s.rel: (s.task, s.task_ok) for s in discover(tmp_path)}
    assert found == {
        "task=a/p0.parquet": ("a", True),
        "task=a/sub/p1.parquet": ("a", True),
        "task=b/p.parquet": ("b", True),
        "task=../x/p.parquet": ("..", False),
        "task=a b/p.parquet": ("a b", False),
        "task=%2E%2E/p.parquet": ("%2E%2E", False),
        "other/p.parquet": (None, False),
    }
    only_b = {s.rel for s in discover(tmp_path, tasks=["b"])}
    assert "task=b/p.parquet" in only_b and "task=a/p0.parquet" not in only_b
    assert "task=../x/p.parquet" in only_b  # invalid ones stay listed, to be reported
    assert list_tasks(tmp_path) == ["a", "b"]
    with pytest.raises(FileNotFoundError):
        discover(tmp_path / "missing")
