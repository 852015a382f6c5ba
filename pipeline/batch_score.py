"""Batch scoring: re-score a whole query–ad inventory with an exported model on Ray Data.

    resolve_models  driver: model URI / export dir -> one ONNX task dir per task (+ name, version);
                    an input task without a model fails here, before anything is written
    plan            driver: the files and their footers (pipeline.ingest.plan_read): the row
                    count per task, Ray-readable files vs files checked on the driver
    read + mark     ray.data.read_parquet over the task partitions; `mark_for_scoring`
                    (map_batches; Ray fuses it into the read tasks or the actors) adds the
                    validation `reason` (features.validate via pipeline.ingest.mark_block)
    ScoreBlock      map_batches callable class on an actor pool: one ORT session per task per
                    actor (serving.scorer.Scorer), loaded once; tokenises with the shared
                    PairTokenizer, sorts the block by token length and scores it in trimmed
                    batches (dynamic padding); writes scored rows and quarantined rows to the
                    staging directory and returns only their counts
    publish         driver: drop files of failed attempts, check every staged file's row count
                    and row conservation per task, then rename staging -> OUTPUT in one step

Exactly once: everything is written under a hidden staging directory next to OUTPUT
(`.<name>.staging-<id>`, same filesystem) and published by one rename (an atomic exchange
with --overwrite), so readers see the old result or the new one, never a part. A killed run
leaves only its hidden staging directory, removed by the next run once its owner is dead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.output import pid_alive, replace_dir
from features.schema import TASK_DIR_PREFIX, read_schema
from features.tokenize import TOKEN_COLUMNS, trim_batch
from features.validate import (
    RESERVED_COLUMNS,
    ValidationConfig,
    ValidationReport,
    check_file,
    to_quarantine,
)
from models.config import ConfigError
from serving.scorer import Scorer, load_scorers, sigmoid

QUARANTINE_DIR = "_quarantine"
SUMMARY_FILE = "_batch_score.json"  # hidden from data readers (features.schema.discover)
OWNER_FILE = "_owner.json"
# Written on every scored row; an input column of one of these names is replaced, not
# carried over (InputLayout.replaced, reported in the summary; the quarantine keeps it).
OUTPUT_COLUMNS = ("score", "model_name", "model_version")
# Columns the read adds for validation; not part of the scored output. An input file with a
# column of one of these names is refused (InputLayout.reserved): the run would lose it.
INTERNAL_COLUMNS = RESERVED_COLUMNS  # the run adds these to rows itself
STATS_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string()),
        pa.field("reason", pa.string()),  # null: scored rows
        pa.field("rows", pa.int64()),
        pa.field("file", pa.string()),  # relative to the staging directory
    ]
)
DEFAULT_BATCH_SIZE = 128  # rows per ORT run: length-sorted, so little padding even at 128+
DEFAULT_BLOCK_ROWS = 4096  # rows per actor call (one sort bucket, one output file per task)
STALE_UNOWNED_S = 3600.0
READ_CPUS = 0.5  # Ray CPUs per read + validation task

Log = Callable[[str], None]


class BatchScoreError(RuntimeError):
    """The run could not produce a complete, consistent result; nothing was published."""


class OutputExists(ValueError):
    """OUTPUT holds a result already and overwrite was not asked for."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class BatchScoreConfig:
    """How a batch scoring run executes.

    batch_size: rows per ORT session run (after length sorting).
    block_rows: rows per actor call; each call sorts its rows by token length and writes one
        file per task, so this also sets the output file size.
    num_actors: size of the scoring actor pool (one ORT session per task in each).
    num_gpus_per_actor: GPUs reserved per actor; None: 1 when the cluster has a GPU, else 0.
    threads_per_actor: ORT intra-op threads; None: the cluster's CPUs / num_actors.
    cpus_per_actor: CPUs Ray reserves per actor; None: leaves one CPU for reading/validation.
    max_text_chars: longer query/title/description text is quarantined (text_too_long).
    progress_every_s: seconds between progress lines (0: after every block).
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    block_rows: int = DEFAULT_BLOCK_ROWS
    num_actors: int = 1
    num_gpus_per_actor: float | None = None
    threads_per_actor: int | None = None
    cpus_per_actor: float | None = None
    max_text_chars: int = 10_000
    progress_every_s: float = 5.0

    def __post_init__(self):
        errors = []
        for name in ("batch_size", "block_rows", "num_actors", "max_text_chars"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errors.append(f"{name} must be an integer >= 1, got {v!r}")
        t = self.threads_per_actor
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            errors.append(f"threads_per_actor must be an integer >= 1 or None, got {t!r}")
        for name in ("num_gpus_per_actor", "cpus_per_actor", "progress_every_s"):
            v = getattr(self, name)
            if v is None and name != "progress_every_s":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                errors.append(f"{name} must be a number >= 0, got {v!r}")
            elif not math.isfinite(v):
                errors.append(f"{name} must be finite, got {v!r}")
        if errors:
            raise ConfigError(errors)


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class TaskModel:
    """One task's exported model: its local directory and the labels written on every row."""

    task: str
    path: str
    name: str
    version: str


def _model_label(scorer: Scorer) -> tuple[str, str]:
    """(model_name, model_version): the registered name and version for a registry model,
    else the export directory and the export's model hash."""
    name = scorer.meta.get("registered_name")
    if not name:
        root = scorer.task_dir.parent if (scorer.task_dir.parent / "index.json").is_file() else None
        name = str((root or scorer.task_dir).resolve())
    return str(name), str(scorer.model_version)


def resolve_models(
    model: str, tasks: list[str], tracking_uri: str | None = None
) -> dict[str, TaskModel]:
    """Each task's local model directory and labels; raises naming tasks without a model.

    serving.scorer.load_scorers resolves the URI (export dir, task dir, models:/ per task or
    prefix@alias); the sessions it opens here only check the models load, then are dropped:
    the actors open their own.
    """
    scorers = load_scorers(
        str(model), providers="cpu", intra_op_threads=1, tracking_uri=tracking_uri
    )
    missing = [t for t in tasks if t not in scorers]
    if missing:
        raise ValueError(
            f"no model for task(s) {missing} found in the input: model {model} has "
            f"{sorted(scorers)}; pass --tasks to score only those"
        )
    out = {}
    for task in tasks:
        s = scorers[task]
        name, version = _model_label(s)
        out[task] = TaskModel(task, str(s.task_dir.resolve()), name, version)
    return out


# ---------------------------------------------------------------------------------------------
# The scoring actor


class ScoreBlock:
    """Scores blocks of validated rows and writes them to the staging directory.

    Loaded once per actor: one `serving.scorer.Scorer` (ORT session) per task. Called on a
    pyarrow table of marked rows (validation `reason`, null when valid): valid rows get
    `score`, `model_name`, `model_version` and go to staging/task=<name>/, the others to
    staging/_quarantine/. Returns one STATS_SCHEMA row per (file, task, reason), so the
    driver counts rows and checks files without moving the data. `keep_columns` (the input
    columns of each task's scored rows) must not name an OUTPUT_COLUMNS column: the file
    would hold two columns of that name, which readers refuse.
    """

    def __init__(
        self,
        models: dict[str, TaskModel],
        staging: str,
        keep_columns: dict[str, list[str]],
        quarantine_columns: list[str],
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int | None = None,
        providers: str | list[str] = "auto",
    ):
        self.models = dict(models)
        self.scorers = {
            t: Scorer(m.path, providers=providers, intra_op_threads=threads)
            for t, m in self.models.items()
        }
        self.staging = Path(staging)
        clash = {t: [c for c in cols if c in OUTPUT_COLUMNS] for t, cols in keep_columns.items()}
        assert not any(clash.values()), f"keep_columns name output columns: {clash}"
        self.keep_columns = keep_columns
        self.quarantine_columns = quarantine_columns
        self.batch_size = int(batch_size)

    def score_rows(self, task: str, rows: pa.Table) -> np.ndarray:
        """(N,) float32 probabilities of `rows` under `task`'s model, in row order."""
        scorer = self.scorers[task]
        batch = {
            c: rows.column(c).to_numpy(zero_copy_only=False)
            for c in ("query", "ad_title", "ad_description", "task")
            if c in rows.column_names
        }
        enc = scorer.tokenizer(batch)  # (N, L) token arrays, L = the block's longest row
        lengths = enc["attention_mask"].sum(axis=1)  # (N,)
        order = np.argsort(lengths, kind="stable")  # length buckets: little padding per batch
        out = np.empty(rows.num_rows, dtype=np.float32)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            b = trim_batch({c: enc[c][idx] for c in TOKEN_COLUMNS if c in enc})
            out[idx] = sigmoid(scorer.score_tokens(**b))
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        stats: list[dict] = []
        reason = table.column("reason")
        bad = table.filter(pc.is_valid(reason))
        if bad.num_rows:
            stats += self._write_quarantine(bad)
        good = table.filter(pc.is_null(reason))
        for task in pc.unique(good.column("task")).to_pylist():
            rows = good.filter(pc.equal(good.column("task"), task))
            scores = self.score_rows(task, rows)
            stats.append(self._write_scored(task, rows, scores))
        return pa.Table.from_pylist(stats, schema=STATS_SCHEMA)

    def _write_scored(self, task: str, rows: pa.Table, scores: np.ndarray) -> dict:
        m = self.models[task]
        n = rows.num_rows
        out = _select(rows, self.keep_columns[task])
        out = out.append_column("score", pa.array(scores, pa.float32()))
        out = out.append_column("model_name", pa.array([m.name] * n, pa.string()))
        out = out.append_column("model_version", pa.array([m.version] * n, pa.string()))
        rel = f"{TASK_DIR_PREFIX}{task}/part-{uuid.uuid4().hex[:16]}.parquet"
        _write(out, self.staging / rel)
        return {"task": task, "reason": None, "rows": n, "file": rel}

    def _write_quarantine(self, bad: pa.Table) -> list[dict]:
        rel = f"{QUARANTINE_DIR}/rows-{uuid.uuid4().hex[:16]}.parquet"
        _write(to_quarantine(_select(bad, self.quarantine_columns)), self.staging / rel)
        counts = bad.group_by(["task", "reason"]).aggregate([([], "count_all")])
        return [
            {"task": r["task"], "reason": r["reason"], "rows": r["count_all"], "file": rel}
            for r in counts.to_pylist()
        ]


def _select(table: pa.Table, columns: list[str]) -> pa.Table:
    """`columns` of `table` in that order; ones the table lacks become null strings."""
    cols, names = [], []
    for c in columns:
        names.append(c)
        if c in table.column_names:
            cols.append(table.column(c))
        else:
            cols.append(pa.nulls(table.num_rows, pa.string()))
    return pa.table(cols, names=names)


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy")


# ---------------------------------------------------------------------------------------------
# Counting


@dataclass
class TaskScoreCounts:
    rows_in: int = 0
    scored: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.scored + self.quarantined


@dataclass
class BatchScoreResult:
    """What a run did: rows per task (in = scored + quarantined, checked), speed, output.

    dropped_columns: extra input columns whose types conflict across files (their values are
    not carried over). replaced_columns: input columns named like an output column (OUTPUT_COLUMNS):
    the scored rows hold this run's values instead; quarantined rows keep the input's.
    """

    output_dir: str
    model: str
    models: dict[str, dict]
    per_task: dict[str, TaskScoreCounts]
    seconds: float
    rows_unreadable: int = 0
    bad_files: list[dict] = field(default_factory=list)
    dropped_columns: list[str] = field(default_factory=list)
    replaced_columns: list[str] = field(default_factory=list)
    files: int = 0
    first_block_s: float | None = None
    steady_rows_per_s: float | None = None

    @property
    def rows_in(self) -> int:
        return sum(t.rows_in for t in self.per_task.values())

    @property
    def rows_scored(self) -> int:
        return sum(t.scored for t in self.per_task.values())

    @property
    def rows_quarantined(self) -> int:
        return sum(t.quarantined for t in self.per_task.values())

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        """Per-task rows in / scored / quarantined (with reasons), the totals, the verdict."""
        w = max([len("task"), len("TOTAL"), *(len(t) for t in self.per_task)])
        head = f"{'task':<{w}}  {'rows_in':>9}  {'scored':>9}  {'quarantined':>11}  check  reasons"
        lines = [head]
        for name in sorted(self.per_task):
            t = self.per_task[name]
            reasons = " ".join(f"{r}={c}" for r, c in sorted(t.reasons.items()))
            ok = "ok" if t.balanced else "FAIL"
            lines.append(
                f"{name:<{w}}  {t.rows_in:>9}  {t.scored:>9}  {t.quarantined:>11}  {ok:<5}  {reasons}"
            )
        lines.append(
            f"{'TOTAL':<{w}}  {self.rows_in:>9}  {self.rows_scored:>9}  {self.rows_quarantined:>11}"
        )
        return "\n".join(lines)

    def summary(self) -> str:
        lines = [
            self.table(),
            f"scored {self.rows_scored:,} of {self.rows_in:,} rows in {self.seconds:.1f} s "
            f"({self.rows_per_s:,.0f} rows/s; {self._steady()}); "
            f"quarantined {self.rows_quarantined:,}",
            f"output: {self.output_dir} ({self.files} files; quarantine in {QUARANTINE_DIR}/)",
        ]
        if self.dropped_columns:
            lines.append(f"columns dropped (types conflict across files): {self.dropped_columns}")
        if self.replaced_columns:
            lines.append(
                f"input columns replaced by this run's: {self.replaced_columns} (the scored "
                f"rows hold the new values; quarantined rows keep the input's)"
            )
        for b in self.bad_files:
            lines.append(f"file problem: {b['path']}: {b['reason']}: {b['detail']}")
        return "\n".join(lines)

    def _steady(self) -> str:
        if self.first_block_s is None:
            return "nothing to score"
        rate = f"{self.steady_rows_per_s:,.0f} rows/s" if self.steady_rows_per_s else "n/a"
        return f"first block after {self.first_block_s:.1f} s, then {rate}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            rows_in=self.rows_in,
            rows_scored=self.rows_scored,
            rows_quarantined=self.rows_quarantined,
            rows_per_s=self.rows_per_s,
        )
        return d


# ---------------------------------------------------------------------------------------------
# Staging and publishing


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.staging-"


def _owner_alive(info: dict) -> bool:
    # Another host's: cannot tell, so leave it.
    return info.get("host") != socket.gethostname() or pid_alive(info.get("pid"))


def clean_stale_staging(out: Path, log: Log | None = None) -> list[Path]:
    """Remove staging directories of `out` left by runs that died (owner process gone)."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for d in out.parent.glob(_staging_prefix(out) + "*"):
        try:
            info = json.loads((d / OWNER_FILE).read_text())
            stale = not _owner_alive(info)
        except (OSError, ValueError):
            # No owner: a result swapped out by a run killed before deleting it (it has a
            # summary), or a staging directory abandoned right after creation.
            try:
                old = time.time() - d.stat().st_mtime > STALE_UNOWNED_S
            except FileNotFoundError:
                continue  # removed meanwhile
            stale = old or (d / SUMMARY_FILE).is_file()
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            if log:
                log(f"removed the staging directory of a killed run: {d}")
    return removed


def _own_staging_prefix(out: Path) -> str:
    return f"{_staging_prefix(out)}{socket.gethostname()}-{os.getpid()}-"


def remove_own_staging(out: Path) -> list[Path]:
    """Remove the staging directories of `out` this process made, once the run is over and
    its writers are gone (Ray shut down): scoring actors still writing when a stopped run
    cleaned up can create files in it again."""
    removed = []
    if out.parent.is_dir():
        for d in out.parent.glob(_own_staging_prefix(out) + "*"):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _make_staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f"{_own_staging_prefix(out)}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    (staging / OWNER_FILE).write_text(json.dumps(info))
    return staging


def check_output(inp: Path, out: Path, overwrite: bool) -> None:
    """Refuse an OUTPUT that overlaps the input, or that holds a result (without overwrite)."""
    if out == inp or inp in out.parents or out in inp.parents:
        raise ValueError(f"output {out} must not be the input {inp}, inside it or above it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExists(
                f"output {out} exists; choose another --output or pass --overwrite to replace it"
            )
        if not (out / SUMMARY_FILE).is_file():
            raise ValueError(
                f"output {out} is not empty and is not a batch scoring result "
                f"(no {SUMMARY_FILE}); refusing to replace it"
            )


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Make `staging` the output in one rename; with overwrite, swap out the old result."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExists(f"output {out} was written by another run meanwhile; not replaced")
        replace_dir(staging, out)
    else:
        try:
            os.rename(staging, out)  # replaces an empty directory, never a non-empty one
        except OSError as e:
            raise OutputExists(f"output {out} appeared meanwhile; not replaced ({e})") from None
    (out / OWNER_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class InputLayout:
    """From the file footers: each task's columns (first-seen order), the union over all
    files, the schema every marked block is cast to, extra columns dropped for conflicts,
    input columns the output replaces (named like an OUTPUT_COLUMNS column) and, per file,
    columns named like an INTERNAL_COLUMNS one (the run refuses those files)."""

    task_columns: dict[str, list[str]]
    all_columns: list[str]
    schema: pa.Schema
    dropped: list[str]
    replaced: list[str] = field(default_factory=list)
    reserved: dict[str, list[str]] = field(default_factory=dict)

    def scored_columns(self, task: str) -> list[str]:
        """The input columns carried over to `task`'s scored rows (before the output's)."""
        skip = (*INTERNAL_COLUMNS, *OUTPUT_COLUMNS)
        return [c for c in self.task_columns.get(task, []) if c not in skip]


def input_layout(sources) -> InputLayout:
    per_task: dict[str, list[str]] = {}
    union: list[str] = []
    schemas = []
    reserved: dict[str, list[str]] = {}
    for src in sources:
        try:
            schema = pq.read_schema(src.path)
        except (OSError, pa.ArrowException, ValueError):
            continue
        schemas.append(schema)
        if clash := [c for c in schema.names if c in INTERNAL_COLUMNS]:
            reserved[src.rel] = clash
        cols = per_task.setdefault(src.task or "", [])
        for c in schema.names:
            if c not in cols:
                cols.append(c)
            if c not in union:
                union.append(c)
    base, dropped = read_schema(schemas)
    for name in ("source_file", "reason"):
        base = base.append(pa.field(name, pa.string()))
    replaced = [c for c in union if c in OUTPUT_COLUMNS]
    return InputLayout(per_task, union, base, dropped, replaced, reserved)


def _actor_resources(cfg: BatchScoreConfig) -> tuple[float, int, float]:
    """(CPUs reserved per actor, ORT threads per actor, GPUs per actor) for this cluster."""
    import ray

    res = ray.cluster_resources()
    cpus = float(res.get("CPU", 1.0))
    gpus = float(res.get("GPU", 0.0))
    n = cfg.num_actors
    num_gpus = cfg.num_gpus_per_actor
    if num_gpus is None:
        num_gpus = min(1.0, gpus / n) if gpus else 0.0
    threads = cfg.threads_per_actor or max(1, int(cpus // n))
    # Ray's file listing needs a whole CPU and each read task half of one: actors that
    # reserved every CPU would starve them (the run would hang), so they leave 1.5 CPUs
    # unreserved. The reservation is bookkeeping; the ORT thread count uses the cores.
    actor_cpus = cfg.cpus_per_actor
    if actor_cpus is None:
        actor_cpus = min(float(threads), max(0.0, cpus - 1.0 - READ_CPUS) / n)
    return actor_cpus, threads, num_gpus


def _driver_files(plan, cfg: ValidationConfig, staging: Path, report: ValidationReport):
    """Check the files Ray does not read directly: clean tables to score, quarantine written."""
    good_tables, written = [], {}
    for i, src in enumerate(plan.driver_files):
        for k, (good, bad) in enumerate(check_file(src, cfg, report)):
            if good is not None and good.num_rows:
                src_col = pa.array([src.rel] * good.num_rows, pa.string())
                good = good.append_column("source_file", src_col)
                good_tables.append(
                    good.append_column("reason", pa.nulls(good.num_rows, pa.string()))
                )
            if bad is not None and bad.num_rows:
                rel = f"{QUARANTINE_DIR}/file-{i:05d}-{k:05d}.parquet"
                _write(bad, staging / rel)
                written[rel] = bad.num_rows
    return good_tables, written


def _open_errors(plan) -> list[str]:
    problems = []
    for src in plan.driver_files:
        try:
            pq.ParquetFile(src.path)
        except (OSError, pa.ArrowException, ValueError) as e:
            problems.append(f"{src.rel}: {type(e).__name__}: {str(e).splitlines()[0]}")
    return problems


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns: cast by name, absent (or uncastable) ones null."""
    cols = []
    for f in schema:
        i = table.schema.get_field_index(f.name)
        if i >= 0:
            try:
                cols.append(pc.cast(table.column(i), f.type))
                continue
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
        cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def mark_for_scoring(
    table: pa.Table, cfg: ValidationConfig, root: str, schema: pa.Schema
) -> pa.Table:
    """Validate a block read from the partitions (pipeline.ingest.mark_block) into `schema`."""
    from pipeline.ingest import mark_block

    return conform(mark_block(table, cfg, root), schema)


def _build_dataset(plan, driver_good: list[pa.Table], vcfg, schema: pa.Schema, read_cpus: float):
    """The marked rows as one lazy dataset of `schema`: the Ray-read files (validated in
    map_batches) and the clean rows of driver-checked files."""
    import ray.data
    from ray.data.datasource import Partitioning

    parts = []
    if plan.ray_files:
        ds = ray.data.read_parquet(
            [str(s.path) for s in plan.ray_files],
            schema=plan.schema,
            partitioning=Partitioning("hive", base_dir=str(plan.root)),
            include_paths=True,
            include_row_hash=True,
            num_cpus=read_cpus,
        )
        parts.append(
            ds.map_batches(
                mark_for_scoring,
                fn_kwargs={"cfg": vcfg, "root": str(plan.root), "schema": schema},
                batch_format="pyarrow",
                batch_size=None,
                num_cpus=read_cpus,
            )
        )
    if driver_good:
        parts.append(ray.data.from_arrow([conform(t, schema) for t in driver_good]))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def verify_staging(staging: Path, expected: dict[str, int]) -> int:
    """Delete files no successful attempt reported; check each reported file's row count."""
    on_disk = {p.relative_to(staging).as_posix() for p in staging.rglob("*.parquet") if p.is_file()}
    for rel in on_disk - set(expected):
        (staging / rel).unlink()  # left by a failed, retried attempt
    missing = sorted(set(expected) - on_disk)
    if missing:
        raise BatchScoreError(f"staged files reported but not on disk: {missing[:5]}")
    wrong = []
    for rel, rows in expected.items():
        n = pq.read_metadata(staging / rel).num_rows
        if n != rows:
            wrong.append(f"{rel}: {n} rows on disk, {rows} reported")
    if wrong:
        raise BatchScoreError("staged files do not hold the rows reported: " + "; ".join(wrong))
    return len(expected)


class _Progress:
    """Rows done so far, printed with rows/s at most every `every_s`; also times the first
    block (start-up: actors, sessions) and the steady rate after it."""

    def __init__(self, total: int, every_s: float, log: Log | None):
        self.total, self.every_s, self.log = total, every_s, log
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.first_block: float | None = None
        self.first_rows = 0
        self.last_block: float | None = None

    def add(self, rows: int, block: bool = True) -> None:
        self.done += rows
        now = time.perf_counter()
        if block:
            if self.first_block is None:
                self.first_block, self.first_rows = now, self.done
            self.last_block = now
        if self.log and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            pct = 100.0 * self.done / self.total if self.total else 100.0
            self.log(f"scored {self.done:,}/{self.total:,} rows ({pct:.0f}%), {rate:,.0f} rows/s")

    @property
    def first_block_s(self) -> float | None:
        return None if self.first_block is None else self.first_block - self.start

    @property
    def steady_rows_per_s(self) -> float | None:
        if self.first_block is None or self.last_block is None:
            return None
        span = self.last_block - self.first_block
        return (self.done - self.first_rows) / span if span > 0 else None


@dataclass
class ScoringPlan:
    """What a batch scoring run will read, score with and write: every input check done, no
    Ray needed (`plan_scoring`)."""

    input_dir: Path
    output_dir: Path
    overwrite: bool
    read: Any  # pipeline.ingest.ReadPlan
    models: dict[str, TaskModel]
    layout: InputLayout


def plan_scoring(
    model: str,
    input_dir: str | Path,
    output_dir: str | Path,
    tasks: list[str] | None = None,
    overwrite: bool = False,
    tracking_uri: str | None = None,
) -> ScoringPlan:
    """Check the input, the output and the model, without Ray: a job calls this before it
    starts a cluster, so bad input fails in a second. Raises as `score_inventory` does."""
    from pipeline.ingest import plan_read

    inp, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not inp.is_dir():
        raise FileNotFoundError(f"no input directory at {inp}")
    check_output(inp, out, overwrite)
    plan = plan_read(inp, tasks, require_label=False)
    sources = [*plan.ray_files, *plan.driver_files]
    if not sources:
        which = f" for tasks {list(tasks)}" if tasks else ""
        raise FileNotFoundError(
            f"no data files under {inp}{which} (expected {inp}/{TASK_DIR_PREFIX}<name>/*.parquet)"
        )
    input_tasks = sorted({s.task for s in sources if s.task_ok})
    absent = [t for t in tasks or () if t not in input_tasks]
    if absent:
        raise ValueError(f"no {TASK_DIR_PREFIX}<name> data under {inp} for task(s) {absent}")
    models = resolve_models(model, input_tasks, tracking_uri)
    unopenable = _open_errors(plan)
    if unopenable:
        raise ValueError(
            "cannot open input file(s), so their rows cannot be accounted for: "
            + "; ".join(unopenable)
        )
    layout = input_layout(sources)
    if layout.reserved:
        raise ValueError(
            f"input file(s) have column(s) named like the ones batch scoring adds itself "
            f"{list(INTERNAL_COLUMNS)}, so their values would be lost; rename them: "
            + "; ".join(f"{rel}: {cols}" for rel, cols in layout.reserved.items())
        )
    return ScoringPlan(inp, out, overwrite, plan, models, layout)


def score_inventory(
    model: str,
    input_dir: str | Path,
    output_dir: str | Path,
    tasks: list[str] | None = None,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_actors: int = 1,
    num_gpus_per_actor: float | None = None,
    *,
    config: BatchScoreConfig | None = None,
    tracking_uri: str | None = None,
    log: Log | None = print,
    planned: ScoringPlan | None = None,
) -> BatchScoreResult:
    """Score every row under `input_dir` (ROOT/task=<name>/*.parquet) into `output_dir`.

    Writes OUTPUT/task=<name>/*.parquet (every input column + score (float32 probability),
    model_name, model_version; an input column of one of those names is replaced: listed in
    `replaced_columns`), OUTPUT/_quarantine/*.parquet (rows that failed validation, as they
    came in, with `reason` and `source_file`) and OUTPUT/_batch_score.json (the summary),
    published together at the end. Raises, with nothing written: ValueError when a task in
    the input has no model, or an input file cannot be opened or has a column named like an
    INTERNAL_COLUMNS one; OutputExists when OUTPUT holds a result (without `overwrite`);
    BatchScoreError when rows in != scored + quarantined for a task. `config`, when given,
    replaces batch_size / num_actors / num_gpus_per_actor. `planned`: the result of
    `plan_scoring` for the same arguments, checked already. Needs a running Ray (jobs start it).
    """
    cfg = config or BatchScoreConfig(
        batch_size=batch_size, num_actors=num_actors, num_gpus_per_actor=num_gpus_per_actor
    )
    start = time.perf_counter()
    p = planned or plan_scoring(model, input_dir, output_dir, tasks, overwrite, tracking_uri)
    out = p.output_dir
    clean_stale_staging(out, log)
    staging = _make_staging(out)
    try:
        result = _run(p.read, p.models, str(model), cfg, staging, p.layout, log)
        result.output_dir = str(out)
        result.seconds = time.perf_counter() - start
        (staging / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        publish(staging, out, p.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - start
    if log:
        log(result.summary())
    return result


def _run(
    plan, models: dict[str, TaskModel], model: str, cfg, staging: Path, layout, log
) -> BatchScoreResult:
    import ray

    vcfg = ValidationConfig(
        max_text_chars=cfg.max_text_chars,
        require_label=False,
        known_tasks=tuple(models),
        max_bad_fraction=1.0,
    )
    counts: dict[str, TaskScoreCounts] = {t: TaskScoreCounts() for t in models}
    for src in plan.ray_files:
        counts[src.task].rows_in += plan.file_rows[src.rel]
    report = ValidationReport(max_bad_fraction=1.0)
    driver_good, expected = _driver_files(plan, vcfg, staging, report)
    for name, t in report.per_task.items():
        c = counts.setdefault(name, TaskScoreCounts())
        c.rows_in += t.rows_in
        c.quarantined += t.quarantined
        for r, k in t.reasons.items():
            c.reasons[r] = c.reasons.get(r, 0) + k

    actor_cpus, threads, num_gpus = _actor_resources(cfg)
    keep = {t: layout.scored_columns(t) for t in models}
    qcols = [c for c in layout.all_columns if c not in INTERNAL_COLUMNS]
    qcols += [c for c in ("task", "source_file", "reason") if c not in qcols]
    ds = _build_dataset(plan, driver_good, vcfg, layout.schema, read_cpus=READ_CPUS)
    total = sum(c.rows_in for c in counts.values())
    progress = _Progress(total, cfg.progress_every_s, log)
    if log:
        log(
            f"scoring {total:,} rows of {len(models)} task(s) with {cfg.num_actors} actor(s) "
            f"({threads} ORT thread(s), {num_gpus:g} GPU each), ORT batch {cfg.batch_size}"
        )
    progress.add(sum(c.quarantined for c in counts.values()), block=False)
    if ds is not None:
        # Blocks of at most block_rows rows (streaming, no shuffle): each is one actor call,
        # so the pool shares the work and progress arrives block by block.
        ds = ds.repartition(target_num_rows_per_block=cfg.block_rows)
        scored = ds.map_batches(
            ScoreBlock,
            fn_constructor_kwargs={
                "models": models,
                "staging": str(staging),
                "keep_columns": keep,
                "quarantine_columns": qcols,
                "batch_size": cfg.batch_size,
                "threads": threads,
            },
            batch_format="pyarrow",
            batch_size=cfg.block_rows,
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=actor_cpus,
            num_gpus=num_gpus,
        )
        for stats in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            for r in stats.to_pylist():
                c = counts.setdefault(r["task"], TaskScoreCounts())
                if r["reason"] is None:
                    c.scored += r["rows"]
                else:
                    c.quarantined += r["rows"]
                    c.reasons[r["reason"]] = c.reasons.get(r["reason"], 0) + r["rows"]
                expected[r["file"]] = expected.get(r["file"], 0) + r["rows"]
            progress.add(int(pc.sum(stats.column("rows")).as_py() or 0))
    files = verify_staging(staging, expected)
    result = BatchScoreResult(
        output_dir="",
        model=model,
        models={t: asdict(m) for t, m in models.items()},
        per_task=counts,
        seconds=0.0,
        rows_unreadable=report.rows_unreadable,
        bad_files=[asdict(b) for b in report.bad_files],
        dropped_columns=layout.dropped,
        replaced_columns=layout.replaced,
        files=files,
        first_block_s=progress.first_block_s,
        steady_rows_per_s=progress.steady_rows_per_s,
    )
    broken = {t: c for t, c in counts.items() if not c.balanced}
    if broken:
        if log:
            log(result.table())
        detail = "; ".join(
            f"{t}: {c.rows_in} in != {c.scored} scored + {c.quarantined} quarantined"
            for t, c in broken.items()
        )
        raise BatchScoreError(f"row conservation broken, nothing published: {detail}")
    return result
