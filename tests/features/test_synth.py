"""The synthetic ads generator: determinism, layout, and tasks that disagree on the same pairs."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.synth import SYNTH_TASKS, Intent, Product, generate, rule_label
from features.validate import validate_dir


def digest(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.parquet"))
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = generate(root / "data", rows_per_task=600, seed=3)
    return root / "data", summary


def test_same_seed_same_bytes(tmp_path, synth):
    root, _ = synth
    generate(tmp_path / "again", rows_per_task=600, seed=3)
    assert digest(tmp_path / "again") == digest(root)
    generate(tmp_path / "other", rows_per_task=600, seed=4)
    assert digest(tmp_path / "other") != digest(root)


def test_layout_and_columns(synth):
    root, summary = synth
    assert SYNTH_TASKS == ("exact_match", "broad_match", "shopping", "brand_protect")
    assert sorted(p.name for p in root.iterdir()) == sorted(f"task={t}" for t in SYNTH_TASKS)
    table = pq.read_table(root / "task=shopping", partitioning=None)
    assert table.num_rows == 600 and len(summary["tasks"]["shopping"]["files"]) == 2
    types = {f.name: f.type for f in table.schema}
    assert types == {
        "query_id": pa.string(), "query": pa.string(), "ad_id": pa.string(),
        "ad_title": pa.string(), "ad_description": pa.string(), "grade": pa.float32(),
        "label": pa.int8(),
    }  # fmt: skip
    grades = np.array(table.column("grade").to_pylist())
    labels = np.array(table.column("label").to_pylist())
    assert set(grades) <= {0.0, 1.0, 2.0, 3.0} and len(set(grades)) == 4
    assert ((grades >= 2) == (labels == 1)).all()  # graded labels consistent with the binary one
    assert 0 < table.column("ad_description").null_count < 600
    queries = table.column("query").to_pylist()
    assert len(set(queries)) < len(queries)  # several ads per query (per-query metrics)


def test_output_passes_validation(tmp_path, synth):
    root, _ = synth
    report = validate_dir(root, tmp_path / "out")
    assert report.rows_in == 4 * 600 and report.rows_quarantined == 0


def test_tasks_disagree_on_the_same_pairs(synth):
    root, summary = synth
    for task, info in summary["tasks"].items():
        assert 0.2 <= info["positive_rate"] <= 0.65, (task, info["positive_rate"])
    assert summary["disagreement"] > 0.25
    assert summary["task_blind_ceiling"] < 0.92
    labels = {}
    for task in SYNTH_TASKS:
        t = pq.read_table(root / f"task={task}", partitioning=None)
        labels[task] = {
            (q, a): y
            for q, a, y in zip(
                t["query"].to_pylist(), t["ad_id"].to_pylist(), t["label"].to_pylist()
            )
        }
    shared = set(labels["exact_match"]) & set(labels["broad_match"])
    assert len(shared) > 200  # the tasks share pairs...
    differ = sum(labels["exact_match"][k] != labels["broad_match"][k] for k in shared)
    assert differ / len(shared) > 0.2  # ...and label many of them differently


def test_rules_on_a_competitor_ad():
    query = Intent("brand_type", brand="Strideon", type="running shoes")
    own = Product(0, "Strideon", "running shoes", "footwear", (("colour", "red"),))
    rival = Product(1, "Velora", "running shoes", "footwear", (("colour", "red"),))
    boots = Product(2, "Velora", "hiking boots", "footwear", (("colour", "red"),))
    kettle = Product(3, "Hearthly", "electric kettle", "kitchen", (("colour", "red"),))
    got = {t: [rule_label(t, query, p) for p in (own, rival, boots, kettle)] for t in SYNTH_TASKS}
    assert got == {
        "exact_match": [1, 0, 0, 0],
        "broad_match": [1, 1, 1, 0],
        "shopping": [1, 1, 0, 0],
        "brand_protect": [1, 0, 0, 0],
    }
    colour = Intent("attr_type", type="running shoes", attrs=(("colour", "blue"),))
    assert rule_label("exact_match", colour, own) == 0 and rule_label("shopping", colour, own) == 1
    category = Intent("category", category="footwear")
    assert [rule_label(t, category, boots) for t in SYNTH_TASKS] == [0, 1, 0, 1]


def test_scoring_inventory_and_options(tmp_path):
    summary = generate(
        tmp_path / "inv",
        50,
        seed=1,
        tasks=["shopping"],
        with_labels=False,
        with_weight=True,
        files_per_task=3,
    )
    table = pq.read_table(tmp_path / "inv/task=shopping", partitioning=None)
    assert "label" not in table.column_names and "grade" not in table.column_names
    assert set(table.column("weight").to_pylist()) <= {1.0, 2.0}
    assert len(summary["tasks"]["shopping"]["files"]) == 3 and "disagreement" not in summary
    with pytest.raises(ValueError, match="unknown synthetic task"):
        generate(tmp_path / "x", 10, seed=1, tasks=["nope"])


def test_generate_refuses_a_non_empty_out_and_overwrite_replaces_it_whole(tmp_path):
    out = tmp_path / "s9"
    generate(out, 30, seed=1, tasks=["shopping"], files_per_task=3)
    with pytest.raises(ValueError, match=re.escape(f"--out {out} is not empty") + ".*--overwrite"):
        generate(out, 10, seed=1, tasks=["shopping"])
    assert pq.read_table(out / "task=shopping", partitioning=None).num_rows == 30  # untouched
    summary = generate(out, 10, seed=1, tasks=["shopping"], overwrite=True)
    assert sorted(p.name for p in (out / "task=shopping").iterdir()) == [
        "part-0.parquet",
        "part-1.parquet",
    ]  # the first run's part-2 is gone
    assert pq.read_table(out / "task=shopping", partitioning=None).num_rows == 10
    assert summary["tasks"]["shopping"]["files"] == [
        str(out / "task=shopping" / f"part-{k}.parquet") for k in range(2)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s9"]  # no staging left
    (out / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"notes\.txt.*not part of a synthetic data set"):
        generate(out, 10, seed=1, tasks=["shopping"], overwrite=True)


def test_generate_failing_part_way_leaves_out_as_it_was(tmp_path, monkeypatch):
    import features.synth as synth

    out = tmp_path / "inv"
    generate(out, 20, seed=1, tasks=["shopping"])
    before = digest(out)

    real, calls = synth._task_table, []

    def fail_second(*args, **kwargs):  # the first task is written, the second fails
        calls.append(1)
        if len(calls) % 2 == 0:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "_task_table", fail_second)
    with pytest.raises(OSError, match="disk full"):
        generate(out, 10, seed=2, tasks=["shopping", "exact_match"], overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "new", 10, seed=2)
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv"]


def test_generate_refuses_an_out_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(
        ValueError, match=re.escape(f"--out {tmp_path / 'f'} exists and is not a directory")
    ):
        generate(tmp_path / "f", 3, seed=1, tasks=["shopping"])


def test_rows_per_task_has_a_maximum(tmp_path, monkeypatch):
    import features.synth as synth

    def build(*args, **kwargs):
        raise AssertionError("generated instead of refusing the row count")

    monkeypatch.setattr(synth, "_Generator", build)
    too_many = getattr(synth, "MAX_ROWS_PER_TASK", 10_000_000) + 1
    with pytest.raises(ValueError, match=f"rows_per_task must be an integer in .*{too_many}"):
        generate(tmp_path / "big", too_many, seed=0)
    assert not (tmp_path / "big").exists()
