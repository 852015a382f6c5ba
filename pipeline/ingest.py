"""Ray Data ingest: read the contract layout, validate and tokenise in `map_batches`.

    plan_read         driver: list files, read footers; files Ray can read as they are (valid
                      task dir, required columns, castable types, consistent `task` column)
                      vs files that need the row-level path (binary text, numbers stored as
                      strings, whole-file problems)
    read_partitioned  ray.data.read_parquet over the first group with one schema, the task
                      from the Hive partition, plus the file path and a per-row hash
    mark_block        map_batches (pyarrow): task from the path, row_id, source_file and the
                      validation `reason` (features.validate.mark_rows)
    + the second group checked on the driver (features.validate.check_file), clean rows unioned
    TokenizeBatch     map_batches (numpy), a callable class loaded once per worker: token
                      arrays (features.tokenize.PairTokenizer, pad_to_max), task_id, label, weight

The transforms are plain functions / classes on pyarrow tables and `dict[str, np.ndarray]`
batches, testable without Ray. Nothing here starts Ray: jobs do (jobs.runtime.ensure_ray).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.schema import (
    ID_COLUMNS,
    TASK_DIR_PREFIX,
    TEXT_COLUMNS,
    Source,
    discover,
    missing_columns,
    read_schema,
    scan_castable,
)
from features.tasks import TaskRegistry
from features.tokenize import TOKEN_COLUMNS, PairTokenizer
from features.validate import (
    RESERVED_COLUMNS,
    ThresholdExceeded,
    ValidationConfig,
    ValidationReport,
    check_file,
    flat_name,
    mark_rows,
    to_quarantine,
)

if TYPE_CHECKING:
    import ray.data

ARRAY_COLUMNS = (*TOKEN_COLUMNS, "task_id", "label", "weight")
# Columns the tokenised dataset keeps besides ARRAY_COLUMNS (when present).
KEEP_COLUMNS = ("row_id", "task", "source_file", *ID_COLUMNS, "grade")


# ---------------------------------------------------------------------------------------------
# Planning and reading


@dataclass
class ReadPlan:
    """Which files Ray reads directly (`ray_files`, read with `schema`) and which not.

    driver_files: files checked row by row on the driver (features.validate.check_file):
    unusual types, a task column to check, or whole-file problems to report.
    """

    root: Path
    ray_files: list[Source] = field(default_factory=list)
    driver_files: list[Source] = field(default_factory=list)
    schema: pa.Schema | None = None
    dropped_columns: list[str] = field(default_factory=list)
    file_rows: dict[str, int] = field(default_factory=dict)


def _task_column_consistent(md: pq.FileMetaData, task: str) -> bool:
    """Whether the footer statistics prove that every `task` value equals the partition."""
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        for j in range(rg.num_columns):
            c = rg.column(j)
            if c.path_in_schema != "task":
                continue
            st = c.statistics
            if st is None or not st.has_min_max or st.null_count:
                return False
            lo, hi = (v.decode() if isinstance(v, bytes) else v for v in (st.min, st.max))
            if not lo == hi == task:
                return False
    return True


def plan_read(
    root: str | Path, tasks: list[str] | tuple[str, ...] | None = None, require_label: bool = True
) -> ReadPlan:
    """Sort the files under `root` (of `tasks`, default all) into Ray-read and driver-checked."""
    plan = ReadPlan(Path(root).resolve())
    schemas = []
    for src in discover(plan.root, tasks):
        try:
            md = pq.read_metadata(src.path)
            schema = md.schema.to_arrow_schema()
        except (OSError, pa.ArrowException, ValueError):
            plan.driver_files.append(src)
            continue
        direct = (
            src.task_ok
            and not any(n in schema.names for n in RESERVED_COLUMNS)  # refused on the driver
            and not missing_columns(schema, require_label)
            and all(scan_castable(f.name, f.type) for f in schema)
            and ("task" not in schema.names or _task_column_consistent(md, src.task))
        )
        if direct:
            plan.ray_files.append(src)
            plan.file_rows[src.rel] = md.num_rows
            schemas.append(schema)
        else:
            plan.driver_files.append(src)
    if schemas:
        plan.schema, plan.dropped_columns = read_schema(schemas)
    return plan


def read_partitioned(
    root: str | Path,
    tasks: list[str] | tuple[str, ...] | None = None,
    *,
    plan: ReadPlan | None = None,
) -> ray.data.Dataset:
    """`ray.data.read_parquet` over the Hive-partitioned root, one schema for all files.

    Columns: the contract columns at their read types (features.schema.READ_TYPES; missing
    ones null), extra columns, the partition's `task`, `path` (the file) and `row_hash` (a
    per-row id, stable across reads of the same files); `mark_block` turns these into
    `task`, `source_file` and `row_id`. Reads only the files `plan_read` marks as
    Ray-readable; the others are handled (and reported) by `ingest`.
    """
    import ray.data
    from ray.data.datasource import Partitioning

    plan = plan or plan_read(root, tasks)
    if not plan.ray_files:
        raise FileNotFoundError(
            f"no readable data files under {plan.root} "
            f"(expected {plan.root}/{TASK_DIR_PREFIX}<name>/*.parquet)"
        )
    # The task comes from the partition (mark_block takes it from the path): a `task` field in
    # the pinned schema would make the reader prefer a (possibly absent) file column.
    schema = plan.schema.remove(plan.schema.get_field_index("task"))
    ctx = ray.data.DataContext.get_current()
    v2 = ctx.use_datasource_v2
    # The V1 Parquet reader: files and footers are already listed by plan_read, and the V2
    # listing stage costs tens of seconds of wall time per read on a small, busy machine.
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(
            [str(s.path) for s in plan.ray_files],
            schema=schema,
            partitioning=Partitioning("hive", base_dir=str(plan.root)),
            include_paths=True,
            include_row_hash=True,
        )
    finally:
        ctx.use_datasource_v2 = v2


# ---------------------------------------------------------------------------------------------
# Transforms (plain functions/classes; Ray calls them in map_batches)


def mark_block(table: pa.Table, cfg: ValidationConfig, root: str) -> pa.Table:
    """Validate one block read by `read_partitioned` (pyarrow batch format).

    Replaces `path`/`row_hash` by `source_file` (relative to root) and `row_id`, sets `task`
    from the partition directory and adds `reason` (null for a valid row).
    """
    paths = table.column("path")
    uniq = pc.unique(paths).to_pylist()
    rels = [os.path.relpath(p, root).replace(os.sep, "/") for p in uniq]
    tasks = [r.split("/", 1)[0][len(TASK_DIR_PREFIX) :] for r in rels]
    idx = pc.index_in(paths, value_set=pa.array(uniq, pa.string()))
    source = pa.array(rels, pa.string()).take(idx)
    task = pa.array(tasks, pa.string()).take(idx)
    row_id = table.column("row_hash")
    table = table.drop_columns(["path", "row_hash"])
    i = table.schema.get_field_index("task")
    table = table.set_column(i, "task", task) if i >= 0 else table.append_column("task", task)
    table = table.append_column("row_id", row_id).append_column("source_file", source)
    return mark_rows(table, cfg)


def _column(batch: dict[str, np.ndarray], name: str, n: int, default: float) -> np.ndarray:
    """A float32 column with nulls / NaN / absence replaced by `default`."""
    if name not in batch:
        return np.full(n, default, dtype=np.float32)
    v = np.asarray(batch[name])
    if v.dtype == object:
        v = np.array([np.nan if x is None else x for x in v], dtype=np.float64)
    v = v.astype(np.float32)
    if not np.isnan(default):
        v[np.isnan(v)] = default
    return v


class TokenizeBatch:
    """Adds model inputs to a validated `dict[str, np.ndarray]` batch.

    Adds input_ids / attention_mask / token_type_ids (int64, (N, max_length): fixed width so
    that batches concatenate; `features.tokenize.trim_batch` cuts them per batch), task_id
    (int64, from `registry`), label (float32, NaN when the batch has none) and weight
    (float32, 1.0 when absent or null). The tokenizer is loaded once, in __init__ (once per
    Ray worker). With keep_text=False the raw text columns are dropped from the output.
    """

    def __init__(
        self,
        tokenizer_dir: str | Path,
        max_length: int,
        registry: dict[str, int] | TaskRegistry,
        *,
        task_prefix: bool = False,
        keep_text: bool = True,
    ):
        self.tokenizer = PairTokenizer(
            tokenizer_dir, max_length, pad_to_max=True, task_prefix=task_prefix
        )
        ids = registry.to_dict() if isinstance(registry, TaskRegistry) else dict(registry)
        self.task_ids = ids
        self.keep_text = keep_text

    def task_id(self, tasks) -> np.ndarray:
        names, inverse = np.unique(np.asarray(tasks, dtype=object).astype(str), return_inverse=True)
        unknown = [t for t in names if t not in self.task_ids]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the registry has {list(self.task_ids)}")
        return np.array([self.task_ids[t] for t in names], dtype=np.int64)[inverse]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["query"])
        out = self.tokenizer(batch)
        out["task_id"] = self.task_id(batch["task"])
        out["label"] = _column(batch, "label", n, np.nan)
        out["weight"] = _column(batch, "weight", n, 1.0)
        if not self.keep_text:
            for c in TEXT_COLUMNS:
                out.pop(c, None)
        return out


# ---------------------------------------------------------------------------------------------
# Ingest


@dataclass
class IngestResult:
    """dataset: the tokenised ray.data.Dataset (lazy; columns ARRAY_COLUMNS + KEEP_COLUMNS
    present, + text with keep_text); report: the validation counts (rows in = clean +
    quarantined); quarantine_files: what was written to quarantine_dir."""

    dataset: ray.data.Dataset
    report: ValidationReport
    quarantine_files: list[str] = field(default_factory=list)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns (missing or uncastable ones become null)."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            try:
                cols.append(pc.cast(table.column(f.name), f.type))
                continue
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
        cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _row_ids(path: Path, start: int, n: int) -> pa.Array:
    seed = int.from_bytes(hashlib.blake2b(str(path).encode(), digest_size=8).digest(), "little")
    ids = (np.uint64(seed) + np.arange(start, start + n, dtype=np.uint64)) * np.uint64(
        0x9E3779B97F4A7C15
    )
    return pa.array(ids, pa.uint64())


def _driver_rows(plan: ReadPlan, cfg: ValidationConfig, report: ValidationReport):
    """Check the driver files: (clean tables with row_id/source_file, quarantine tables)."""
    good_tables, bad_tables = [], []
    for src in plan.driver_files:
        start = 0
        for good, bad in check_file(src, cfg, report):
            if bad is not None and bad.num_rows:
                bad_tables.append((src, bad))
            if good is not None and good.num_rows:
                good = good.append_column("row_id", _row_ids(src.path, start, good.num_rows))
                good = good.append_column(
                    "source_file", pa.array([src.rel] * good.num_rows, pa.string())
                )
                start += good.num_rows
                good_tables.append(good)
    return good_tables, bad_tables


def summarize_block(table: pa.Table) -> tuple[list[tuple[str, str | None, int]], pa.Table]:
    """Counts per (task, reason) of a marked block, and its rejected rows (quarantine form)."""
    counts = (
        table.select(["task", "reason"]).group_by(["task", "reason"]).aggregate([([], "count_all")])
    )
    rows = [(r["task"], r["reason"], r["count_all"]) for r in counts.to_pylist()]
    return rows, to_quarantine(table.filter(pc.is_valid(table.column("reason"))))


def _summarize(marked: ray.data.Dataset, report: ValidationReport) -> list[pa.Table]:
    """Count a materialised marked dataset into `report`; return its rejected rows.

    One plain Ray task per block (the blocks are already in the object store), so only
    counts and rejected rows travel to the driver.
    """
    import ray

    task = ray.remote(summarize_block)
    bad = []
    for rows, rejected in ray.get([task.remote(ref) for ref in marked.to_arrow_refs()]):
        for name, reason, n in rows:
            report.add(name, reason, n)
        if rejected.num_rows:
            bad.append(rejected)
    return bad


def _write_quarantine(
    ray_bad: list[pa.Table], driver_bad, quarantine_dir: Path | None
) -> list[str]:
    """Rejected rows of the Ray-read files (one file) and of the driver-checked files."""
    if quarantine_dir is None:
        return []
    written = []
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    if ray_bad:
        path = quarantine_dir / "ingest-rows.parquet"
        pq.write_table(pa.concat_tables(ray_bad, promote_options="permissive"), path)
        written.append(str(path))
    for i, (src, bad) in enumerate(driver_bad):
        # One file per table: row groups of one source may differ in schema.
        path = quarantine_dir / flat_name(i, src.rel)
        pq.write_table(bad, path)
        written.append(str(path))
    return written


def ingest(
    root: str | Path,
    registry: TaskRegistry,
    tokenizer_dir: str | Path,
    max_length: int,
    cfg: ValidationConfig | None = None,
    quarantine_dir: str | Path | None = None,
    *,
    tasks: list[str] | tuple[str, ...] | None = None,
    keep_text: bool = False,
    task_prefix: bool = False,
    concurrency: int | tuple[int, int] | None = None,
    batch_size: int = 256,
) -> IngestResult:
    """Read, validate and tokenise `root` (the contract layout) with Ray Data.

    Reads the partitions of `tasks` (default: the registry's tasks); rows of tasks outside
    `cfg.known_tasks` (default: the registry's) are quarantined as unknown_task. Rejected rows
    are written under `quarantine_dir` (when given) with their reason and counted in
    `result.report` (rows in = clean + quarantined, checked). Raises `ThresholdExceeded`
    (after writing the quarantine) when more than `cfg.max_bad_fraction` of rows were rejected.

    The returned dataset is lazy: tokenisation runs when it is consumed (`to_numpy`, a Ray
    Train shard); `.materialize()` it to tokenise once for several passes. Needs a running
    Ray (jobs.runtime.ensure_ray); `concurrency` sizes the tokenizer actor pool (Ray's
    default autoscaling pool when None).
    """
    import ray.data
    from ray.data.expressions import col

    cfg = cfg or ValidationConfig()
    if cfg.known_tasks is None:
        cfg = replace(cfg, known_tasks=tuple(registry.names))
    tasks = tuple(tasks) if tasks is not None else tuple(registry.names)
    plan = plan_read(root, tasks, cfg.require_label)
    report = ValidationReport(
        max_bad_fraction=cfg.max_bad_fraction,
        quarantine_dir=str(quarantine_dir) if quarantine_dir else None,
    )

    good, ray_bad, schema = None, [], None
    if plan.ray_files:
        for src in plan.ray_files:
            report.add_input(src.task, plan.file_rows[src.rel])
        marked = (
            read_partitioned(root, plan=plan)
            .map_batches(
                mark_block,
                fn_kwargs={"cfg": cfg, "root": str(plan.root)},
                batch_format="pyarrow",
                batch_size=None,
            )
            .materialize()
        )
        ray_bad = _summarize(marked, report)
        good = marked.filter(expr=col("reason").is_null()).drop_columns(["reason"])
        schema = marked.schema().base_schema
        schema = schema.remove(schema.get_field_index("reason"))
    driver_good, driver_bad = _driver_rows(plan, cfg, report)
    report.finish()
    qdir = Path(quarantine_dir) if quarantine_dir else None
    written = _write_quarantine(ray_bad, driver_bad, qdir)
    if report.over_threshold:
        raise ThresholdExceeded(report)
    if report.rows_clean == 0:
        raise FileNotFoundError(f"no valid rows under {plan.root} for tasks {list(tasks)}")
    if driver_good:
        if schema is None:
            base = read_schema([t.schema for t in driver_good])[0]
            schema = base.append(pa.field("row_id", pa.uint64())).append(
                pa.field("source_file", pa.string())
            )
        extra = ray.data.from_arrow([_conform(t, schema) for t in driver_good])
        good = extra if good is None else good.union(extra)

    names = schema.names if schema is not None else good.schema().names
    keep = [c for c in (*TEXT_COLUMNS, "label", "weight", *KEEP_COLUMNS) if c in names]
    tokenised = good.select_columns(keep).map_batches(
        TokenizeBatch,
        fn_constructor_args=(str(tokenizer_dir), max_length, registry.to_dict()),
        fn_constructor_kwargs={"task_prefix": task_prefix, "keep_text": keep_text},
        batch_format="numpy",
        batch_size=batch_size,
        concurrency=concurrency,
    )
    return IngestResult(tokenised, report, written)


# ---------------------------------------------------------------------------------------------
# Materialising for the training loop


def sort_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows in an order fixed by their content: task_id, tokens, label, weight (then row_id).

    The same rows give the same arrays whatever order Ray produced them in and wherever the
    files lie; rows equal in all of these are interchangeable for training.
    """
    ids = arrays["input_ids"].astype(np.uint64)  # (N, L)
    powers = np.cumprod(np.full(ids.shape[1], 0x100000001B3, dtype=np.uint64))  # wraps mod 2^64
    h = (ids * powers[None, :]).sum(axis=1, dtype=np.uint64)  # (N,)
    keys = [arrays[c] for c in ("row_id", "weight", "label") if c in arrays]
    order = np.lexsort((*keys, h, arrays["task_id"]))
    return {k: v[order] for k, v in arrays.items()}


def to_numpy(
    dataset, columns: list[str] | tuple[str, ...] | None = None, sort: bool = True
) -> dict[str, np.ndarray]:
    """Materialise a tokenised dataset (or a Ray Train shard / DataIterator) as numpy arrays.

    Returns {column: array}: token columns (N, max_length) int64, task_id int64, label and
    weight float32, row_id uint64, strings as object arrays. With `sort`, rows come in an
    order fixed by their content (task, tokens, label, weight), the same on every run and
    machine; shuffle with your own seeded generator. Raises ValueError when it has no rows.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for batch in dataset.iter_batches(batch_size=4096, batch_format="numpy"):
        for k, v in batch.items():
            if columns is None or k in columns or k in ARRAY_COLUMNS:
                parts.setdefault(k, []).append(np.asarray(v))
    if not parts:
        raise ValueError("the dataset has no rows")
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if sort and "input_ids" in out and "task_id" in out:
        out = sort_rows(out)
    if columns is not None:
        out = {k: v for k, v in out.items() if k in columns}
    return out
