"""Deterministic train/dev/test split by a hash of the query, for data that comes without one.

A query's split depends only on its text (lower-cased, whitespace collapsed), so every row of a
query, in every task and every file, lands in the same split: no query is in two splits.

The split is written through `features.output.staged_output`: all of it or nothing.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.output import staged_output
from features.schema import TASK_DIR_PREFIX, discover, normalize_table

SPLITS = ("train", "dev", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def check_fractions(fractions) -> tuple[float, float, float]:
    """Three finite, non-negative fractions (train, dev, test) that sum to 1."""
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"fractions must be three numbers, got {fractions!r}") from None
    if len(fr) == 3:
        # nan passes `f < 0` and the sum check (every comparison with nan is False).
        bad = [f"{name}={f!r}" for name, f in zip(SPLITS, fr) if not math.isfinite(f) or f < 0]
        if bad:
            raise ValueError(
                f"fractions must be finite, non-negative numbers, got {', '.join(bad)}"
            )
    if len(fr) != 3 or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(
            f"fractions must be three non-negative numbers (train, dev, test) summing to 1, "
            f"got {fractions!r}"
        )
    return fr  # type: ignore[return-value]


def query_key(query: str | None) -> str:
    return " ".join(str(query or "").lower().split())


def query_bucket(query: str | None) -> float:
    """A uniform number in [0, 1) from sha1 of the normalised query."""
    digest = hashlib.sha1(query_key(query).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(query: str | None, fractions=DEFAULT_FRACTIONS) -> str:
    """ "train", "dev" or "test" for this query (same answer on every machine and run)."""
    train, dev, _ = check_fractions(fractions)
    b = query_bucket(query)
    return "train" if b < train else "dev" if b < train + dev else "test"


def split_column(queries: pa.ChunkedArray | pa.Array, fractions=DEFAULT_FRACTIONS) -> np.ndarray:
    """Split name per row (object array); each distinct query is hashed once."""
    fr = check_fractions(fractions)
    values = queries.to_pylist()
    memo: dict[str | None, str] = {}
    for q in set(values):
        memo[q] = split_of(q, fr)
    return np.array([memo[q] for q in values], dtype=object)


def split_dir(
    input_dir: str | Path,
    out_dir: str | Path,
    fractions=DEFAULT_FRACTIONS,
    *,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Write OUT/{train,dev,test}/task=<name>/<file> from a contract root; returns row counts.

    Only valid task partitions are read (validate first to get them); each output file keeps
    its source's columns and types. An OUT that is not empty is refused unless `overwrite`
    (then the old split is replaced whole); OUT is written in one piece or not at all (see
    `staged_output`). Returns {split: {task: rows}}.
    """
    fr = check_fractions(fractions)
    inp, out = Path(input_dir).resolve(), Path(out_dir).resolve()
    sources = discover(inp)
    bad = [s.rel for s in sources if not s.task_ok]
    if bad:
        raise ValueError(f"refusing files outside valid task=<name> directories: {bad[:5]}")
    if not sources:
        raise FileNotFoundError(f"no data files under {inp}")
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    with staged_output(
        out, overwrite, _is_split_dir, "a split (train/, dev/, test/)", inputs=(inp,)
    ) as staging:
        for src in sources:
            table = pq.read_table(src.path)
            names = split_column(normalize_table(table.select(["query"])).column("query"), fr)
            flat = src.rel.split("/", 1)[1].replace("/", "__")
            for split in SPLITS:
                part = table.filter(pa.array(names == split))
                if part.num_rows == 0:
                    continue
                path = staging / split / f"{TASK_DIR_PREFIX}{src.task}" / flat
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(part, path)
                counts[split][src.task] = counts[split].get(src.task, 0) + part.num_rows
    return counts


def _is_split_dir(name: str) -> bool:
    return name in SPLITS
