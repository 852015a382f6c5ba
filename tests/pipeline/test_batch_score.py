"""Batch scoring on Ray Data: scores, row accounting, exactly-once publication, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch_score import (
    QUARANTINE_DIR,
    SUMMARY_FILE,
    BatchScoreConfig,
    BatchScoreError,
    OutputExists,
    ScoreBlock,
    TaskModel,
    check_output,
    clean_stale_staging,
    publish,
    score_inventory,
    verify_staging,
)
from serving.scorer import Scorer

TASKS = ("exact_match", "broad_match")


def make_tiny_export(base: Path, encoder_dir: Path, tasks=TASKS) -> Path:
    """A tiny-encoder checkpoint with non-zero adapters, exported to ONNX (built once per
    pytest session: later calls reuse the folder)."""
    out = base / "tiny-export"
    if (out / "index.json").is_file():
        return out
    import torch

    from features.tasks import TaskRegistry
    from models.checkpoint import build_model, save_checkpoint
    from models.config import AdapterConfig
    from pipeline.export import export_checkpoint

    torch.manual_seed(0)
    model = build_model(
        str(encoder_dir), AdapterConfig(num_tasks=len(tasks)), TaskRegistry(tasks), head_dropout=0.0
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.trainable_state().items()):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    ckpt = save_checkpoint(model.eval(), base / "tiny-ckpt", max_length=64)
    export_checkpoint(ckpt, out)
    return out


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_encoder_dir):
    return make_tiny_export(tmp_path_factory.getbasetemp(), tiny_encoder_dir)


def synth_inventory(root: Path, rows: int, tasks=TASKS, files_per_task: int = 2, seed: int = 1):
    from features.synth import generate

    generate(root, rows, seed, tasks=list(tasks), with_labels=False, files_per_task=files_per_task)
    return root


def read_scored(out: Path, task: str) -> pa.Table:
    files = sorted((out / f"task={task}").glob("*.parquet"))
    assert files, f"no scored files for {task}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def read_quarantine(out: Path) -> list[pa.Table]:
    return [pq.read_table(f) for f in sorted((out / QUARANTINE_DIR).glob("*.parquet"))]


def staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.staging-*"))


def quiet_cfg(**kw) -> BatchScoreConfig:
    return BatchScoreConfig(**{"progress_every_s": 0.0, **kw})


# ---------------------------------------------------------------------------------------------
# Without Ray: the actor class on a hand-built block, publication, checks


def test_score_block_keeps_row_order_and_splits_quarantine(export_dir, tmp_path):
    scorer = Scorer(export_dir / "exact_match", providers="cpu")
    queries = ["red running shoes", "a much longer query about waterproof hiking boots", "tent"]
    titles = ["Strideon Red Running Shoes", "Ridgeline Hiking Boots - Size 9", "Trailcraft Tent"]
    n = 7  # rows of very different lengths, interleaved, so sorting would show
    q = [queries[i % 3] * (1 + i % 2) for i in range(n)]
    t = [titles[i % 3] for i in range(n)]
    reason = [None, None, "empty_query", None, None, None, "null_ad_title"]
    table = pa.table(
        {
            "query": q,
            "ad_title": t,
            "row_key": [f"k{i}" for i in range(n)],
            "task": ["exact_match"] * n,
            "source_file": ["task=exact_match/a.parquet"] * n,
            "reason": pa.array(reason, pa.string()),
        }
    )
    model = TaskModel("exact_match", str(export_dir / "exact_match"), "m", "v1")
    block = ScoreBlock(
        {"exact_match": model},
        str(tmp_path),
        keep_columns={"exact_match": ["query", "ad_title", "row_key"]},
        quarantine_columns=["query", "ad_title", "row_key", "task", "source_file", "reason"],
        batch_size=2,  # several ORT batches of length-sorted rows
        threads=1,
    )
    stats = block(table).to_pylist()
    scored = [s for s in stats if s["reason"] is None]
    bad = [s for s in stats if s["reason"] is not None]
    assert [s["rows"] for s in scored] == [5]
    assert sorted((s["reason"], s["rows"]) for s in bad) == [
        ("empty_query", 1),
        ("null_ad_title", 1),
    ]
    out = pq.read_table(tmp_path / scored[0]["file"])
    assert out.column_names == [
        "query",
        "ad_title",
        "row_key",
        "score",
        "model_name",
        "model_version",
    ]
    assert out.column("row_key").to_pylist() == ["k0", "k1", "k3", "k4", "k5"]  # input order
    good = [i for i in range(n) if reason[i] is None]
    want = scorer.score([q[i] for i in good], [t[i] for i in good])
    np.testing.assert_allclose(out.column("score").to_numpy(), want, atol=1e-5)
    assert out.schema.field("score").type == pa.float32()
    assert set(out.column("model_version").to_pylist()) == {"v1"}
    q_out = pq.read_table(tmp_path / bad[0]["file"])
    assert sorted(q_out.column("row_key").to_pylist()) == ["k2", "k6"]
    assert set(q_out.column("reason").to_pylist()) == {"empty_query", "null_ad_title"}


def test_check_output_refuses_overlap_and_foreign_dirs(tmp_path):
    inp = tmp_path / "inv"
    inp.mkdir()
    with pytest.raises(ValueError, match="must not be the input"):
        check_output(inp, inp / "scores", overwrite=False)
    with pytest.raises(ValueError, match="must not be the input"):
        check_output(inp, tmp_path, overwrite=True)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExists, match="--overwrite"):
        check_output(inp, other, overwrite=False)
    with pytest.raises(ValueError, match="not a batch scoring result"):
        check_output(inp, other, overwrite=True)
    check_output(inp, tmp_path / "new", overwrite=False)  # absent: fine


def test_publish_swaps_whole_result_and_cleans_dead_staging(tmp_path):
    out = tmp_path / "scores"
    out.mkdir()
    (out / SUMMARY_FILE).write_text("{}")
    (out / "old.parquet").write_text("old")
    staging = tmp_path / ".scores.staging-abc"
    staging.mkdir()
    (staging / SUMMARY_FILE).write_text("{}")
    (staging / "new.parquet").write_text("new")
    with pytest.raises(OutputExists):
        publish(staging, out, overwrite=False)
    publish(staging, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_FILE, "new.parquet"]
    assert not staging.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["scores"]  # old result removed too

    dead = tmp_path / ".scores.staging-dead"
    dead.mkdir()
    import socket

    pid = 2**22 + 12345  # above the default pid_max: no such process
    (dead / "_owner.json").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    live = tmp_path / ".scores.staging-live"
    live.mkdir()
    import os

    (live / "_owner.json").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    )
    assert clean_stale_staging(out) == [dead]
    assert live.exists() and not dead.exists()


def test_verify_staging_drops_orphans_and_checks_counts(tmp_path):
    t = pa.table({"x": [1, 2, 3]})
    (tmp_path / "task=a").mkdir()
    pq.write_table(t, tmp_path / "task=a" / "part-1.parquet")
    pq.write_table(t, tmp_path / "task=a" / "part-orphan.parquet")  # a failed attempt's file
    assert verify_staging(tmp_path, {"task=a/part-1.parquet": 3}) == 1
    assert not (tmp_path / "task=a" / "part-orphan.parquet").exists()
    with pytest.raises(BatchScoreError, match="2 reported"):
        verify_staging(tmp_path, {"task=a/part-1.parquet": 2})
    with pytest.raises(BatchScoreError, match="not on disk"):
        verify_staging(tmp_path, {"task=a/part-1.parquet": 3, "task=a/gone.parquet": 1})


def test_config_lists_every_error():
    from models.config import ConfigError

    with pytest.raises(ConfigError) as e:
        BatchScoreConfig(batch_size=0, num_actors=-1, num_gpus_per_actor=-0.5, threads_per_actor=0)
    assert len(e.value.errors) == 4


# ---------------------------------------------------------------------------------------------
# On a real local Ray


def test_scores_equal_the_scorer_across_files_and_blocks(export_dir, tmp_path, ray_local):
    inv = synth_inventory(tmp_path / "inv", 120, files_per_task=3)
    out = tmp_path / "scores"
    res = score_inventory(
        str(export_dir), inv, out, config=quiet_cfg(block_rows=50, batch_size=16), log=None
    )
    assert res.rows_in == res.rows_scored == 240 and res.rows_quarantined == 0
    assert res.files >= 2 * 3  # several blocks per task: several files each
    for task in TASKS:
        got = read_scored(out, task)
        inp = pq.read_table(inv / f"task={task}")
        assert got.num_rows == inp.num_rows == 120
        assert got.column_names == [*inp.column_names, "score", "model_name", "model_version"]
        key = ["query_id", "ad_id"]
        assert sorted(got.select(key).to_pylist(), key=str) == sorted(
            inp.select(key).to_pylist(), key=str
        )
        scorer = Scorer(export_dir / task, providers="cpu")
        want = scorer.score(
            got.column("query").to_pylist(),
            got.column("ad_title").to_pylist(),
            got.column("ad_description").to_pylist(),
        )
        np.testing.assert_allclose(got.column("score").to_numpy(), want, atol=1e-5)
        assert got.schema.field("score").type == pa.float32()
        assert set(got.column("model_version").to_pylist()) == {scorer.model_version}
        assert set(got.column("model_name").to_pylist()) == {str(export_dir.resolve())}
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rows_scored"] == 240
    assert not staging_dirs(out)


def _campaign(row_key: str) -> int:
    return 1000 + 7 * int(row_key[1:])


def _mixed_inventory(root: Path) -> tuple[Path, dict[str, str | None]]:
    """Good rows, bad rows and an extra column across Ray-read and driver-checked files.

    Returns the root and the expected outcome per row_key: None (scored) or the reason.
    """
    expect: dict[str, str | None] = {}
    k = iter(range(10**6))

    def keys(n):
        return [f"r{next(k):04d}" for _ in range(n)]

    def campaigns(rk):
        return pa.array([_campaign(r) for r in rk], pa.int64())

    # Ray-read file: good rows, an extra int column, an empty query, a null title, a too-long title.
    n_good = 40
    q = [f"query {i} running shoes" for i in range(n_good)] + ["   ", "ok query", "long one"]
    t = [f"Strideon shoe {i}" for i in range(n_good)] + ["title", None, "x" * 500]
    rk = keys(len(q))
    reasons = [None] * n_good + ["empty_query", "null_ad_title", "text_too_long"]
    d = root / "task=exact_match"
    d.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "row_key": rk,
                "query": q,
                "ad_title": pa.array(t, pa.string()),
                "campaign_id": campaigns(rk),
            }
        ),
        d / "part-0.parquet",
    )
    expect.update(zip(rk, reasons))
    # Driver-checked file (binary title: utf-8 unknown): good rows and one invalid utf-8 title.
    rk = keys(6)
    titles = [
        b"Velora jacket",
        b"Nordvik parka",
        b"bad \xff\xfe title",
        b"Sonique earbuds",
        b"x",
        b"y",
    ]
    pq.write_table(
        pa.table(
            {
                "row_key": rk,
                "query": ["jacket", "parka", "earbuds", "earbuds", "q", "q"],
                "ad_title": pa.array(titles, pa.binary()),
                "campaign_id": campaigns(rk),
            }
        ),
        d / "part-1.parquet",
    )
    expect.update(zip(rk, [None, None, "invalid_utf8", None, None, None]))
    # Second task: a good file (with descriptions) and a file missing ad_title (whole file).
    d = root / "task=broad_match"
    d.mkdir(parents=True)
    rk = keys(30)
    pq.write_table(
        pa.table(
            {
                "row_key": rk,
                "query": [f"coffee maker {i}" for i in range(30)],
                "ad_title": [f"Brewster Coffee Maker {i}" for i in range(30)],
                "ad_description": [None if i % 3 else "Dishwasher safe." for i in range(30)],
                "campaign_id": campaigns(rk),
            }
        ),
        d / "part-0.parquet",
    )
    expect.update(dict.fromkeys(rk))
    rk = keys(5)
    pq.write_table(pa.table({"row_key": rk, "query": ["q"] * 5}), d / "part-1.parquet")
    expect.update(dict.fromkeys(rk, "missing_column"))
    return root, expect


def test_every_input_row_is_scored_or_quarantined(export_dir, tmp_path, ray_local):
    inv, expect = _mixed_inventory(tmp_path / "inv")
    out = tmp_path / "scores"
    res = score_inventory(
        str(export_dir), inv, out, config=quiet_cfg(max_text_chars=200, block_rows=16), log=None
    )
    n_scored = sum(v is None for v in expect.values())
    assert res.rows_in == len(expect)
    assert res.rows_scored == n_scored
    assert res.rows_quarantined == len(expect) - n_scored
    for t in res.per_task.values():
        assert t.rows_in == t.scored + t.quarantined
    assert res.per_task["exact_match"].reasons == {
        "empty_query": 1,
        "null_ad_title": 1,
        "text_too_long": 1,
        "invalid_utf8": 1,
    }
    assert res.per_task["broad_match"].reasons == {"missing_column": 5}

    seen: dict[str, str | None] = {}
    for task in TASKS:
        got = read_scored(out, task)
        assert "campaign_id" in got.column_names  # the extra column, carried through
        assert got.schema.field("campaign_id").type == pa.int64()
        for key, cid in zip(
            got.column("row_key").to_pylist(), got.column("campaign_id").to_pylist()
        ):
            assert key not in seen, f"{key} written twice"
            seen[key] = None
            assert cid == _campaign(key)
        assert np.isfinite(got.column("score").to_numpy()).all()
    for table in read_quarantine(out):
        for key, reason in zip(
            table.column("row_key").to_pylist(), table.column("reason").to_pylist()
        ):
            assert key not in seen, f"{key} written twice"
            seen[key] = reason
    assert seen == expect


def test_rerun_refuses_then_overwrite_replaces_whole(export_dir, tmp_path, ray_local):
    inv = synth_inventory(tmp_path / "inv", 40)
    out = tmp_path / "scores"
    score_inventory(str(export_dir), inv, out, config=quiet_cfg(), log=None)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(OutputExists, match="--overwrite"):
        score_inventory(str(export_dir), inv, out, config=quiet_cfg(), log=None)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    inv2 = synth_inventory(tmp_path / "inv2", 25, tasks=("exact_match",), seed=7)
    res = score_inventory(str(export_dir), inv2, out, overwrite=True, config=quiet_cfg(), log=None)
    assert res.rows_scored == 25
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_FILE, "task=exact_match"]
    assert read_scored(out, "exact_match").num_rows == 25
    assert not set(out.rglob("*.parquet")) & {out / b for b in before}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv", "inv2", "scores"]


def test_task_without_model_fails_before_writing(export_dir, tmp_path, ray_local):
    inv = synth_inventory(tmp_path / "inv", 20, tasks=(*TASKS, "shopping"))
    out = tmp_path / "scores"
    with pytest.raises(ValueError, match=r"no model for task\(s\) \['shopping'\]"):
        score_inventory(str(export_dir), inv, out, config=quiet_cfg(), log=None)
    assert not out.exists() and not staging_dirs(out)


def test_input_columns_named_like_outputs_are_replaced(export_dir, tmp_path, ray_local):
    # Re-scoring a previous result: its score / model_version columns collide with the ones
    # this run writes. The fresh values win, the summary says so, the output reads back.
    inv = synth_inventory(tmp_path / "inv", 30)
    for path in sorted((inv / "task=exact_match").glob("*.parquet")):
        t = pq.read_table(path)
        t = t.set_column(
            t.column_names.index("query"),
            "query",
            pa.array(["  "] + t.column("query").to_pylist()[1:]),
        )  # one row quarantined per file
        t = t.append_column("score", pa.array([-1.0] * t.num_rows, pa.float64()))
        t = t.append_column("model_version", pa.array(["old"] * t.num_rows, pa.string()))
        pq.write_table(t, path)
    out = tmp_path / "scores"
    res = score_inventory(str(export_dir), inv, out, config=quiet_cfg(), log=None)
    assert res.rows_in == 60 and res.rows_quarantined == 2 and res.rows_scored == 58
    for f in sorted((out / "task=exact_match").glob("*.parquet")):
        got = pq.read_table(f, columns=["score", "model_version"])  # one match per name
        assert got.schema.field("score").type == pa.float32()
    whole = pq.read_table(out)  # the whole result as one Hive dataset, as readers take it
    assert whole.num_rows == 58
    assert whole.column_names.count("score") == 1
    assert whole.column_names.count("model_version") == 1
    assert whole.schema.field("score").type == pa.float32()
    scores = whole.column("score").to_numpy()
    assert ((scores > 0.0) & (scores < 1.0)).all()  # fresh probabilities, not the old -1.0
    assert "old" not in whole.column("model_version").to_pylist()
    # The quarantine keeps the rows as they came in, their old columns included.
    (bad,) = [t for t in read_quarantine(out) if "score" in t.column_names]
    assert bad.num_rows == 2 and set(bad.column("score").to_pylist()) == {"-1"}
    assert set(bad.column("model_version").to_pylist()) == {"old"}
    assert res.replaced_columns == ["score", "model_version"]
    assert "score" not in res.dropped_columns  # not a type conflict
    assert "input columns replaced by this run's: ['score', 'model_version']" in res.summary()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["replaced_columns"] == ["score", "model_version"]


def test_input_columns_named_like_internal_ones_are_refused(
    export_dir, tmp_path, ray_local, capsys
):
    # `reason` and `source_file` are the quarantine's own columns (and `row_id` the read's):
    # an input column of such a name would crash the read or vanish from the output.
    from jobs.cli import main

    inv = synth_inventory(tmp_path / "inv", 10)
    path = sorted((inv / "task=broad_match").glob("*.parquet"))[0]
    t = pq.read_table(path)
    pq.write_table(t.append_column("reason", pa.array(["promo"] * t.num_rows)), path)
    out = tmp_path / "scores"
    with pytest.raises(ValueError, match=rf"{path.parent.name}/{path.name}: \['reason'\]"):
        score_inventory(str(export_dir), inv, out, config=quiet_cfg(), log=None)
    code = main(["score", "--model", str(export_dir), "--input", str(inv), "--output", str(out)])
    assert code == 2
    assert "rename them" in capsys.readouterr().err
    assert not out.exists() and not staging_dirs(out)
