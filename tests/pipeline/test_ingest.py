"""Ray Data ingest: the transforms without Ray, then one real run on a local cluster."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.synth import SYNTH_TASKS, generate
from features.tasks import TaskRegistry
from features.tokenize import TOKEN_COLUMNS, PairTokenizer
from features.validate import (
    RESERVED_COLUMNS,
    ThresholdExceeded,
    ValidationConfig,
    validate_table,
)
from pipeline.ingest import (
    ARRAY_COLUMNS,
    TokenizeBatch,
    ingest,
    mark_block,
    plan_read,
    sort_rows,
    to_numpy,
)
from tests.features.crafted import bad_utf8, good_rows, write

MAX_LEN = 40


@pytest.fixture(scope="module")
def registry():
    return TaskRegistry(SYNTH_TASKS)


def test_tokenize_batch_matches_pair_tokenizer(minilm_dir, registry):
    batch = {
        "query": np.array(["red running shoes", "kettle"], dtype=object),
        "ad_title": np.array(["Strideon Red Running Shoes", "Hearthly Kettle"], dtype=object),
        "ad_description": np.array([None, "Glass kettle " * 30], dtype=object),
        "task": np.array(["shopping", "exact_match"], dtype=object),
        "label": np.array([1.0, np.nan]),
        "weight": np.array([2.0, None], dtype=object),
    }
    out = TokenizeBatch(minilm_dir, MAX_LEN, registry)(batch)
    ref = PairTokenizer(minilm_dir, MAX_LEN, pad_to_max=True).encode(
        batch["query"], batch["ad_title"], batch["ad_description"]
    )
    for c in TOKEN_COLUMNS:
        assert out[c].shape == (2, MAX_LEN) and out[c].dtype == np.int64
        np.testing.assert_array_equal(out[c], ref[c])
    assert out["attention_mask"][1].all()  # the long description was truncated, not the query
    assert out["task_id"].tolist() == [registry.id("shopping"), registry.id("exact_match")]
    assert out["label"].dtype == np.float32 and out["label"][0] == 1 and np.isnan(out["label"][1])
    assert out["weight"].tolist() == [2.0, 1.0]  # null weight -> 1.0
    assert out["query"] is batch["query"]  # kept by default

    scoring = {k: batch[k] for k in ("query", "ad_title", "task")}
    out = TokenizeBatch(minilm_dir, MAX_LEN, registry.to_dict(), keep_text=False)(scoring)
    assert np.isnan(out["label"]).all() and out["weight"].tolist() == [1.0, 1.0]
    assert "query" not in out and "ad_title" not in out

    prefixed = TokenizeBatch(minilm_dir, MAX_LEN, registry, task_prefix=True)(scoring)
    ref = PairTokenizer(minilm_dir, MAX_LEN, pad_to_max=True, task_prefix=True)(scoring)
    np.testing.assert_array_equal(prefixed["input_ids"], ref["input_ids"])
    with pytest.raises(ValueError, match="unknown task"):
        TokenizeBatch(minilm_dir, MAX_LEN, registry)(
            {**scoring, "task": np.array(["x", "shopping"])}
        )


def test_mark_block_takes_task_and_source_from_the_path(tmp_path):
    root = tmp_path / "root"
    table = pa.table(
        {
            "query": ["red shoes", " ", "kettle"],
            "ad_title": ["t", "t", "t"],
            "label": [1.0, 0.0, 1.0],
            "task": [None, None, None],
            "path": [str(root / "task=shop/p.parquet")] * 2 + [str(root / "task=other/q.parquet")],
            "row_hash": pa.array([7, 8, 9], pa.uint64()),
        }
    )
    cfg = ValidationConfig(known_tasks=("shop",))
    out = mark_block(table, cfg, str(root))
    assert out.column("task").to_pylist() == ["shop", "shop", "other"]
    assert out.column("source_file").to_pylist() == ["task=shop/p.parquet"] * 2 + [
        "task=other/q.parquet"
    ]
    assert out.column("row_id").to_pylist() == [7, 8, 9]
    assert out.column("reason").to_pylist() == [None, "empty_query", "unknown_task"]
    assert "path" not in out.column_names and "row_hash" not in out.column_names


def test_plan_read_routes_unusual_files_to_the_driver(tmp_path):
    write(tmp_path / "task=a/plain.parquet", good_rows(3))
    rows = good_rows(3)
    rows["query_id"] = [1, 2, 3]
    rows["query"] = pa.array(rows["query"], pa.large_string())
    write(tmp_path / "task=a/drift.parquet", rows)
    write(tmp_path / "task=a/same_task.parquet", {**good_rows(2), "task": ["a", "a"]})
    write(tmp_path / "task=a/other_task.parquet", {**good_rows(2), "task": ["a", "b"]})
    write(
        tmp_path / "task=a/binary.parquet", {**good_rows(1), "query": pa.array([b"x"], pa.binary())}
    )
    write(tmp_path / "task=a/no_label.parquet", {"query": ["q"], "ad_title": ["t"]})
    write(tmp_path / "task=a/reserved.parquet", {**good_rows(1), "reason": ["mine"]})
    (tmp_path / "task=a/junk.parquet").write_bytes(b"junk")
    write(tmp_path / "task=a b/p.parquet", good_rows(1))
    plan = plan_read(tmp_path)
    assert [s.rel for s in plan.ray_files] == [
        "task=a/drift.parquet",
        "task=a/plain.parquet",
        "task=a/same_task.parquet",
    ]
    assert {s.rel for s in plan.driver_files} == {
        "task=a/other_task.parquet",
        "task=a/binary.parquet",
        "task=a/no_label.parquet",
        "task=a/reserved.parquet",
        "task=a/junk.parquet",
        "task=a b/p.parquet",
    }
    assert plan.file_rows["task=a/plain.parquet"] == 3
    assert plan.schema.field("query_id").type == pa.string()
    assert "task=a/no_label.parquet" in {
        s.rel for s in plan_read(tmp_path, require_label=False).ray_files
    }


def test_sort_rows_is_independent_of_input_order():
    rng = np.random.default_rng(0)
    arrays = {
        "input_ids": rng.integers(0, 5, size=(50, 6)),
        "task_id": rng.integers(0, 3, size=50),
        "label": rng.integers(0, 2, size=50).astype(np.float32),
        "weight": np.ones(50, np.float32),
    }
    a = sort_rows(arrays)
    perm = rng.permutation(50)
    b = sort_rows({k: v[perm] for k, v in arrays.items()})
    for k in arrays:
        np.testing.assert_array_equal(a[k], b[k])
    assert (np.diff(a["task_id"]) >= 0).all()


def test_threshold_is_checked_before_tokenising(tmp_path, registry, minilm_dir):
    # Only driver-checked files (binary text): the threshold fires before any Ray work.
    rows = {
        "query": pa.concat_arrays([bad_utf8(b"\xff"), pa.array(["ok"])]),
        "ad_title": ["t", "t"],
        "label": [1, 0],
    }
    rows["query"] = rows["query"].view(pa.binary())
    write(tmp_path / "data/task=shopping/p.parquet", rows)
    with pytest.raises(ThresholdExceeded) as e:
        ingest(tmp_path / "data", registry, minilm_dir, MAX_LEN, quarantine_dir=tmp_path / "q")
    assert e.value.report.per_reason == {"invalid_utf8": 1} and e.value.report.rows_clean == 1
    assert "refused" in str(e.value) and str(tmp_path / "q") in str(e.value)
    assert pq.read_table(next((tmp_path / "q").glob("*.parquet"))).column("reason").to_pylist() == [
        "invalid_utf8"
    ]


def _plain_path(root, registry, tok_dir) -> dict[str, np.ndarray]:
    """The same data through pyarrow + the bare PairTokenizer, no Ray."""
    tok = PairTokenizer(tok_dir, MAX_LEN, pad_to_max=True)
    parts = []
    cfg = ValidationConfig(known_tasks=tuple(registry.names))
    for task in registry.names:
        for f in sorted((root / f"task={task}").glob("*.parquet")):
            if set(RESERVED_COLUMNS) & set(pq.read_schema(f).names):
                continue  # a whole-file refusal: none of its rows is clean
            good, _ = validate_table(pq.read_table(f, partitioning=None), cfg, task=task)
            if good.num_rows == 0:
                continue
            enc = tok.encode(
                good.column("query").to_pylist(),
                good.column("ad_title").to_pylist(),
                good.column("ad_description").to_pylist()
                if "ad_description" in good.column_names
                else None,
            )
            enc["task_id"] = np.full(good.num_rows, registry.id(task), np.int64)
            enc["label"] = np.asarray(good.column("label").to_pylist(), np.float32)
            enc["weight"] = np.ones(good.num_rows, np.float32)
            parts.append(enc)
    return sort_rows({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


@pytest.mark.integration
def test_ray_ingest_matches_plain_path(tmp_path, ray_local, registry, minilm_dir):
    root = tmp_path / "data"
    generate(root, rows_per_task=40, seed=5)
    # Ray-read file with bad rows; driver-checked files (binary text, a task column that
    # disagrees, an injected task directory); a valid partition outside the registry.
    write(
        root / "task=shopping/mixed.parquet",
        {"query": ["red shoes", "  ", "boots"], "ad_title": ["a", "b", "c"], "label": [1, 0, 2]},
    )
    binary = pa.concat_arrays(
        [pa.array([b"hiking boots"], pa.binary()), bad_utf8(b"\xff").view(pa.binary())]
    )
    write(
        root / "task=exact_match/binary.parquet",
        {"query": binary, "ad_title": ["x", "y"], "label": [1, 0]},
    )
    write(
        root / "task=broad_match/tagged.parquet",
        {
            "query": ["tent", "kettle"],
            "ad_title": ["t", "k"],
            "label": [1, 1],
            "task": ["broad_match", "shopping"],
        },
    )
    write(root / "task=../x/p.parquet", {"query": ["a"], "ad_title": ["b"], "label": [1]})
    write(root / "task=not_registered/p.parquet", {"query": ["a"], "ad_title": ["b"], "label": [1]})
    # A column named like one ingest adds itself: the file is refused, its values kept.
    write(
        root / "task=shopping/reserved.parquet",
        {"query": ["a", "b"], "ad_title": ["c", "d"], "label": [1, 0], "row_id": [7, 8]},
    )

    cfg = ValidationConfig(max_bad_fraction=0.05)
    result = ingest(root, registry, minilm_dir, MAX_LEN, cfg, quarantine_dir=tmp_path / "q")
    report = result.report
    assert report.rows_in == 160 + 3 + 2 + 2 + 1 + 2  # not_registered is not read
    assert report.rows_in == report.rows_clean + report.rows_quarantined
    assert report.per_reason == {
        "empty_query": 1, "label_not_binary": 1, "invalid_utf8": 1,
        "task_mismatch": 1, "invalid_task_name": 1, "reserved_column": 2,
    }  # fmt: skip
    assert any(b.path == "task=../x/p.parquet" for b in report.bad_files)
    quarantined = sum(pq.read_metadata(f).num_rows for f in result.quarantine_files)
    assert quarantined == report.rows_quarantined == 7
    kept = [pq.read_table(f) for f in result.quarantine_files]
    kept = [t for t in kept if "input_row_id" in t.column_names]
    assert len(kept) == 1 and kept[0].column("input_row_id").to_pylist() == ["7", "8"]

    got = to_numpy(result.dataset)
    assert len(got["task_id"]) == report.rows_clean == 163
    assert {"row_id", "task", "source_file", "query_id", "ad_id", "grade"} <= set(got)
    assert "query" not in got  # text dropped by default
    assert len(set(got["row_id"].tolist())) == 163
    want = _plain_path(root, registry, minilm_dir)
    for c in ARRAY_COLUMNS:
        assert got[c].dtype == want[c].dtype, c
        np.testing.assert_array_equal(got[c], want[c], err_msg=c)
    assert got["input_ids"].shape == (163, MAX_LEN)
