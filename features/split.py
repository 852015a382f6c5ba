"""Deterministic train/dev/test split by a hash of the query, for data that comes without one.

A query's split depends only on its text (lower-cased, whitespace collapsed), so every row of a
query, in every task and every file, lands in the same split: no query is in two splits.

Output folders (`staged_output`, also used by features.synth): an --out that is not empty is
refused unless `overwrite`, and then replaced whole; the new result is written into a hidden
folder next to it and renamed into place at the end, so a run that fails part-way leaves --out
as it was, never half-written or mixed with an older result.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


# ---------------------------------------------------------------------------------------------
# Output folders


def check_out_path(out: Path) -> None:
    """Refuse an output path that is, or lies under, something other than a directory."""
    p = out
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    if p == out and not p.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if not p.is_dir():
        raise ValueError(f"--out {out} cannot be created: {p} is not a directory")


def check_output(
    out: Path,
    overwrite: bool,
    owns: Callable[[str], bool],
    result: str,
    inputs: tuple[Path, ...] = (),
) -> None:
    """Refuse an `out` that overlaps an input, is not a directory or is not empty.

    With `overwrite` a non-empty `out` is accepted when it holds only a `result` of the same
    kind (every entry name passes `owns`): it is replaced whole, so it must hold nothing else.
    """
    for inp in inputs:
        if out == inp or inp in out.parents:
            raise ValueError(f"--out {out} must not be the input directory or inside it")
        if out in inp.parents:
            raise ValueError(f"--input {inp} is inside --out {out}, which this run would replace")
    check_out_path(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ValueError(
            f"--out {out} is not empty (it holds {entries[:3]}); choose a new --out or pass "
            f"--overwrite to replace it"
        )
    foreign = [name for name in entries if not owns(name)]
    if foreign:
        raise ValueError(
            f"--out {out} holds {foreign[:5]}, which is not part of {result}; refusing to "
            f"replace it (choose a new --out)"
        )


@contextmanager
def staged_output(
    out: Path,
    overwrite: bool,
    owns: Callable[[str], bool],
    result: str,
    inputs: tuple[Path, ...] = (),
) -> Iterator[Path]:
    """Check `out` (`check_output`) and yield a new hidden folder next to it to write into.

    When the block ends without error that folder becomes `out` (an old result is replaced
    whole); when it fails the folder is removed and `out` is left as it was.
    """
    check_output(out, overwrite, owns, result, inputs)
    remove_stale_staging(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written: {e}") from None
    try:
        yield staging
        # Again: another run may have written `out` meanwhile.
        check_output(out, overwrite, owns, result, inputs)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a failed run's partial result


STALE_STAGING_S = 24 * 3600  # no run writes into its staging folder for a day


def remove_stale_staging(out: Path, max_age_s: float = STALE_STAGING_S) -> list[Path]:
    """Remove the hidden folders next to `out` that killed runs left (staging, or a result
    swapped out), once untouched for `max_age_s`: a live run's are never that old."""
    removed = []
    if not out.parent.is_dir():
        return removed
    now = time.time()
    for pattern in (f".{out.name}.staging-*", f".{out.name}.old-*"):
        for d in out.parent.glob(pattern):
            try:
                if now - d.stat().st_mtime > max_age_s:
                    shutil.rmtree(d)
                    removed.append(d)
            except OSError:
                continue  # removed meanwhile, or not ours to remove
    return removed


def _publish(staging: Path, out: Path) -> None:
    if not (out.exists() or out.is_symlink()):
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)
