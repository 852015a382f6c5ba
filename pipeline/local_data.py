"""Read a split in the contract layout into rows and the training loop's arrays, without Ray.

    <root>/task=<name>/**/*.parquet    (columns and types: features.schema)

For jobs that hold a few thousand rows per task in memory (the relbench benchmark, onboarding
one new task). Rows that cannot be trained on are split off with their reason, never dropped
silently: `split_valid` returns them for the caller's quarantine file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from features.tasks import TaskRegistry, check_task_name
from features.tokenize import PairTokenizer


def list_tasks(root: str | Path) -> list[str]:
    """Task names partitioned under `root` (sorted); none found is an error."""
    from features.schema import list_tasks as partitions

    names = partitions(root)
    if not names:
        raise FileNotFoundError(f"no task=<name> partitions under {root}")
    return names


def read_task(
    root: str | Path, task: str, max_rows: int | None = None, sample_seed: int = 0
) -> pd.DataFrame:
    """One task's rows (every parquet file of its partition); at most `max_rows`, drawn at
    random with `sample_seed` (the same rows for every model compared on them)."""
    from features.schema import discover

    check_task_name(task)
    files = [
        s.path for s in discover(root, [task]) if s.task == task and s.path.suffix == ".parquet"
    ]
    if not files:
        raise FileNotFoundError(
            f"no parquet files for task {task!r} under {root} (expected {root}/task={task}/)"
        )
    df = pd.concat([_read_file(f, task) for f in files], ignore_index=True)
    if max_rows is not None and len(df) > max_rows:
        rng = np.random.default_rng([sample_seed, _stable_hash(task)])
        df = df.iloc[np.sort(rng.choice(len(df), max_rows, replace=False))]
    return df.reset_index(drop=True)


def read_split(
    root: str | Path,
    tasks: list[str] | None = None,
    max_rows: int | None = None,
    sample_seed: int = 0,
) -> pd.DataFrame:
    """Rows of `tasks` (default: every partition) under `root`, task by task."""
    names = tasks or list_tasks(root)
    return pd.concat([read_task(root, t, max_rows, sample_seed) for t in names], ignore_index=True)


def split_valid(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows fit to train on, rejected rows with a `reason` column naming field and value)."""
    reasons = pd.Series("", index=df.index, dtype=object)
    for col in ("query", "ad_title"):
        text = df[col]
        bad = text.isna() | (text.astype(str).str.strip() == "")
        reasons[bad & (reasons == "")] = f"{col} is empty"
    label = pd.to_numeric(df["label"], errors="coerce")
    bad = ~label.isin([0, 1])
    reasons[bad & (reasons == "")] = [f"label must be 0 or 1, got {v!r}" for v in df["label"][bad]]
    rejected = reasons != ""
    bad_rows = df[rejected].assign(reason=reasons[rejected])
    return df[~rejected].reset_index(drop=True), bad_rows.reset_index(drop=True)


def to_arrays(
    df: pd.DataFrame, tokenizer: PairTokenizer, tasks: TaskRegistry
) -> dict[str, np.ndarray]:
    """The training loop's arrays: fixed-width tokens (N, L), task_id, label, weight (N,)."""
    unknown = sorted(set(df["task"]) - set(tasks.names))
    if unknown:
        raise ValueError(f"rows of task(s) {unknown} that the model does not have: {tasks.names}")
    batch = {
        "task": df["task"].to_numpy(dtype=object),
        "query": df["query"].astype(str).to_numpy(dtype=object),
        "ad_title": df["ad_title"].astype(str).to_numpy(dtype=object),
    }
    if "ad_description" in df:
        batch["ad_description"] = df["ad_description"].to_numpy(dtype=object)
    enc = tokenizer(batch)
    ids = np.array([tasks.id(t) for t in df["task"]], dtype=np.int64)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc["token_type_ids"],
        "task_id": ids,
        "label": df["label"].to_numpy(dtype=np.float32),
        "weight": np.ones(len(df), dtype=np.float32),
    }


def _read_file(path: Path, task: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    from features.schema import missing_columns, normalize_table

    table = pq.read_table(path)
    missing = missing_columns(table.schema, require_label=True)
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; has {table.column_names}")
    df = normalize_table(table).to_pandas()
    if "task" in df:
        wrong = ~(df["task"].isna() | (df["task"] == task))
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            raise ValueError(
                f"{path} row {row}: task {df['task'].iloc[row]!r} disagrees with partition {task!r}"
            )
    df["task"] = task
    if "query_id" not in df:
        df["query_id"] = df["query"].astype(str)
    else:
        df["query_id"] = df["query_id"].fillna(df["query"].astype(str))
    return df


def _stable_hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "little")
