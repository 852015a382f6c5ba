"""Row validation and quarantine: every input row ends up clean or quarantined with a reason.

`mark_rows` is the one row check (used by `validate_dir`, the Ray ingest and `validate_batch`):
it adds a `reason` column, null for a valid row. Whole-file problems (unreadable, missing a
required column, a type that cannot be normalised, an invalid task directory) are reported by
path in `ValidationReport.bad_files`; their rows are quarantined when they can be read and
counted when only the footer can. A file that cannot be opened at all (its rows cannot be
counted) refuses the data whatever the threshold. Row conservation (rows in = clean +
quarantined) is checked by `ValidationReport.finish`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.output import staged_output
from features.schema import (
    LABEL_COLUMN,
    READ_TYPES,
    STRING_COLUMNS,
    TASK_DIR_PREFIX,
    TEXT_COLUMNS,
    SchemaMismatch,
    Source,
    discover,
    missing_columns,
    normalize_table,
    to_clean,
    type_problem,
)
from features.tasks import TASK_NAME_RE, check_task_name
from models.config import ConfigError

# Row reasons in priority order: a row gets the first that applies.
ROW_REASONS = (
    "invalid_task_name",
    "task_mismatch",
    "unknown_task",
    "invalid_utf8",
    "null_query",
    "empty_query",
    "null_ad_title",
    "empty_ad_title",
    "text_too_long",
    "null_label",
    "label_not_binary",
    "bad_weight",
)
# Whole-file reasons: every row of the file gets it.
FILE_REASONS = (
    "unreadable_file",
    "missing_column",
    "schema_mismatch",
    "invalid_task_name",
    "reserved_column",
)
REASONS = tuple(dict.fromkeys((*ROW_REASONS, *FILE_REASONS)))
# Columns the pipeline adds to rows itself (the quarantine's reason and source_file, ingest's
# row_id): an input file with one of them is refused as a whole (`reserved_column`), its rows
# quarantined with those columns kept as input_<name>.
RESERVED_COLUMNS = ("reason", "source_file", "row_id")
NO_TASK = "(no task dir)"


@dataclass
class ValidationConfig:
    """Row checks and the refusal threshold.

    max_text_chars: a query, title or description longer than this (in characters) is
        quarantined as `text_too_long` (long but sane text is truncated at tokenisation).
    require_label: training data needs a 0/1 label; scoring input has none.
    known_tasks: when set, rows of other tasks are quarantined as `unknown_task`.
    max_bad_fraction: refuse the data when more than this share of rows is quarantined.
    """

    max_text_chars: int = 10_000
    require_label: bool = True
    known_tasks: tuple[str, ...] | None = None
    max_bad_fraction: float = 0.01

    def __post_init__(self):
        errors = []
        m = self.max_text_chars
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            errors.append(f"max_text_chars must be an integer >= 1, got {m!r}")
        if not isinstance(self.require_label, bool):
            errors.append(f"require_label must be true or false, got {self.require_label!r}")
        if self.known_tasks is not None:
            if isinstance(self.known_tasks, str) or not hasattr(self.known_tasks, "__iter__"):
                errors.append(f"known_tasks must be a list of task names, got {self.known_tasks!r}")
            else:
                self.known_tasks = tuple(self.known_tasks)
                for name in self.known_tasks:
                    try:
                        check_task_name(name)
                    except ValueError as e:
                        errors.append(f"known_tasks: {e}")
        f = self.max_bad_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            errors.append(f"max_bad_fraction must be a number in [0, 1], got {f!r}")
        if errors:
            raise ConfigError(errors)


class ThresholdExceeded(ValueError):
    """The data were refused: more rows were quarantined than `max_bad_fraction` allows, or a
    file could not be opened (its rows cannot be accounted for); `.report` has the details."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__(report.message)


# ---------------------------------------------------------------------------------------------
# The row check


def _np(mask) -> np.ndarray:
    """Arrow boolean (chunked) array -> numpy bool, null as False."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


class _Reasons:
    """Per-row reasons; `set` only fills rows that have none yet (priority = call order)."""

    def __init__(self, n: int):
        self.values = np.full(n, None, dtype=object)
        self.free = np.ones(n, dtype=bool)

    def set(self, mask: np.ndarray, reason: str) -> None:
        hit = mask & self.free
        self.values[hit] = reason
        self.free &= ~hit


def utf8_valid(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per-row utf-8 validity of a string column (nulls count as valid)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out = []
    for chunk in chunks:
        try:
            chunk.validate(full=True)
            out.append(np.ones(len(chunk), dtype=bool))
        except pa.ArrowInvalid:
            raw = chunk.view(
                pa.large_binary() if pa.types.is_large_string(chunk.type) else pa.binary()
            )
            out.append(np.array([v is None or _decodes(v) for v in raw.to_pylist()], dtype=bool))
    return np.concatenate(out) if out else np.ones(0, dtype=bool)


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _task_checks(table: pa.Table, task: str | None, reasons: _Reasons, cfg) -> pa.Table:
    n = table.num_rows
    names = table.column_names
    if task is not None:
        if "task" in names:
            file_task = table.column("task")
            reasons.set(np.full(n, not TASK_NAME_RE.match(task)), "invalid_task_name")
            reasons.set(_np(pc.not_equal(file_task, task)), "task_mismatch")
            # Mismatched rows keep the file's value (shown in the quarantine).
            table = table.set_column(names.index("task"), "task", pc.fill_null(file_task, task))
        else:
            table = table.append_column("task", pa.array([task] * n, pa.string()))
    elif "task" not in names:
        raise ValueError("rows need a 'task' column (or pass task=<name>)")
    col = table.column("task")
    ok = [v for v in pc.unique(col).to_pylist() if v is not None and TASK_NAME_RE.match(v)]
    reasons.set(~_np(pc.is_in(col, pa.array(ok, pa.string()))), "invalid_task_name")
    if cfg.known_tasks is not None:
        known = pa.array(list(cfg.known_tasks), pa.string())
        reasons.set(~_np(pc.is_in(col, known)), "unknown_task")
    return table


def _text_checks(table: pa.Table, reasons: _Reasons, cfg) -> None:
    clean = {}
    for c in STRING_COLUMNS:
        if c in table.column_names:
            valid = utf8_valid(table.column(c))
            reasons.set(~valid, "invalid_utf8")
            col = table.column(c)
            # Later checks run on a copy without the invalid values (compute needs utf-8).
            clean[c] = col if valid.all() else pc.if_else(pa.array(valid), col, None)
    for c in ("query", "ad_title"):
        col = clean[c]
        reasons.set(_np(pc.is_null(col)), f"null_{c}")
        stripped = pc.utf8_length(pc.utf8_trim_whitespace(col))
        reasons.set(_np(pc.equal(stripped, 0)), f"empty_{c}")
    for c in TEXT_COLUMNS:
        if c in clean:
            reasons.set(
                _np(pc.greater(pc.utf8_length(clean[c]), cfg.max_text_chars)), "text_too_long"
            )


def _number_checks(table: pa.Table, reasons: _Reasons, cfg) -> None:
    if cfg.require_label:
        if LABEL_COLUMN not in table.column_names:
            raise ValueError("rows have no 'label' column but require_label is set")
        lab = table.column(LABEL_COLUMN)
        reasons.set(_np(pc.or_kleene(pc.is_null(lab), pc.is_nan(lab))), "null_label")
        reasons.set(~_np(pc.is_in(lab, pa.array([0.0, 1.0]))), "label_not_binary")
    if "weight" in table.column_names:
        w = table.column("weight")
        bad = pc.or_kleene(pc.or_kleene(pc.is_nan(w), pc.is_inf(w)), pc.less(w, 0))
        reasons.set(_np(bad), "bad_weight")


def mark_rows(table: pa.Table, cfg: ValidationConfig, task: str | None = None) -> pa.Table:
    """Add a `reason` column (null for a valid row) to a table with normalised types.

    task: the partition the rows come from; the table's `task` column is set to it (a row
    whose own `task` value differs is `task_mismatch` and keeps its value). Without `task`,
    the table must have a `task` column. Raises ValueError when a required column is missing
    or a column already has the name `reason`.
    """
    missing = missing_columns(table.schema, cfg.require_label)
    if missing:
        raise ValueError(f"rows are missing required column(s) {missing}")
    if "reason" in table.column_names:
        raise ValueError("the rows have a column named 'reason', the one this check adds")
    reasons = _Reasons(table.num_rows)
    table = _task_checks(table, task, reasons, cfg)
    _text_checks(table, reasons, cfg)
    _number_checks(table, reasons, cfg)
    return table.append_column("reason", pa.array(reasons.values, pa.string()))


def split_marked(marked: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(valid rows without `reason`, quarantined rows with it)."""
    reason = marked.column("reason")
    good = marked.filter(pc.is_null(reason)).drop_columns(["reason"])
    return good, marked.filter(pc.is_valid(reason))


def validate_table(
    table: pa.Table, cfg: ValidationConfig, task: str | None = None
) -> tuple[pa.Table, pa.Table]:
    """Normalise and check one table: (clean rows, quarantined rows with `reason`).

    A table whose types cannot be normalised is quarantined whole as `schema_mismatch`.
    """
    try:
        norm = normalize_table(table)
    except SchemaMismatch:
        bad = _with_columns(table, "schema_mismatch", task=task)
        return table.schema.empty_table(), bad
    return split_marked(mark_rows(norm, cfg, task))


def validate_batch(
    batch: dict[str, np.ndarray], cfg: ValidationConfig, task: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Check a `dict[str, np.ndarray]` batch: (good rows, bad rows with a `reason` column).

    Both outputs hold the input arrays (any column, any dtype) sliced by row, so nothing is
    re-encoded; the bad rows get `reason`, and a `task` column is added from `task` when the
    batch has none. Text may be str, bytes (checked for utf-8) or None.
    """
    n = _batch_len(batch)
    table = _table_from_batch(batch, n)
    try:
        reason = mark_rows(normalize_table(table), cfg, task).column("reason")
        bad_mask = _np(pc.is_valid(reason))
        reason = np.asarray(reason.to_pylist(), dtype=object)
    except SchemaMismatch:
        bad_mask = np.ones(n, dtype=bool)
        reason = np.full(n, "schema_mismatch", dtype=object)
    cols = {k: np.asarray(v) for k, v in batch.items()}
    if task is not None and "task" not in cols:
        cols["task"] = np.full(n, task, dtype=object)
    good = {k: v[~bad_mask] for k, v in cols.items()}
    bad = {k: v[bad_mask] for k, v in cols.items()}
    bad["reason"] = reason[bad_mask]
    return good, bad


def _batch_len(batch: dict[str, np.ndarray]) -> int:
    lengths = {k: len(v) for k, v in batch.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"batch columns differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def _table_from_batch(batch: dict[str, np.ndarray], n: int) -> pa.Table:
    arrays, names = [], []
    for name in READ_TYPES:
        if name not in batch:
            continue
        v = np.asarray(batch[name])
        if name in STRING_COLUMNS and v.dtype.kind in "OSU":
            # Through bytes, so that invalid utf-8 reaches the row check instead of failing here.
            arr = pa.array([_as_bytes(x) for x in v.tolist()], pa.binary())
        elif v.dtype.kind == "O":
            arr = pa.array([_as_number(x) for x in v.tolist()], pa.float64())
        else:
            arr = pa.array(v)
        arrays.append(arr)
        names.append(name)
    if not arrays:
        return pa.table({"_rows": pa.nulls(n)})
    return pa.table(arrays, names=names)


def _as_bytes(x) -> bytes | None:
    if x is None or (isinstance(x, float) and x != x):
        return None
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    return str(x).encode("utf-8", "surrogatepass")


def _as_number(x) -> float | None:
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class TaskCounts:
    rows_in: int = 0
    clean: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class BadFile:
    """A file with a whole-file problem. rows: its row count (None when even that is unknown)."""

    path: str
    reason: str
    rows: int | None
    detail: str


@dataclass
class ValidationReport:
    """Counts of one validation run; rows_in = rows_clean + rows_quarantined (checked).

    rows_unreadable: quarantined rows that were counted from a footer but could not be read
    (so they are in no quarantine file). Files whose rows cannot even be counted are in
    `bad_files` with rows=None and outside the counts; any such file refuses the data
    (`over_threshold`, whatever `max_bad_fraction`): rows nobody can count are not accounted
    for by the threshold.
    """

    rows_in: int = 0
    rows_clean: int = 0
    rows_quarantined: int = 0
    rows_unreadable: int = 0
    per_task: dict[str, TaskCounts] = field(default_factory=dict)
    per_reason: dict[str, int] = field(default_factory=dict)
    bad_files: list[BadFile] = field(default_factory=list)
    max_bad_fraction: float = 0.01
    over_threshold: bool = False
    message: str = ""
    out_dir: str | None = None
    quarantine_dir: str | None = None

    def _task(self, task: str | None) -> TaskCounts:
        return self.per_task.setdefault(NO_TASK if task is None else task, TaskCounts())

    def add_input(self, task: str | None, rows: int) -> None:
        self.rows_in += rows
        self._task(task).rows_in += rows

    def add(self, task: str | None, reason: str | None, rows: int) -> None:
        """Count `rows` of `task` as clean (reason None) or quarantined with `reason`."""
        if rows <= 0:
            return
        t = self._task(task)
        if reason is None:
            self.rows_clean += rows
            t.clean += rows
            return
        self.rows_quarantined += rows
        t.quarantined += rows
        t.reasons[reason] = t.reasons.get(reason, 0) + rows
        self.per_reason[reason] = self.per_reason.get(reason, 0) + rows

    def add_marked(self, task: str | None, reason: pa.ChunkedArray | pa.Array) -> None:
        values, counts = np.unique(
            np.asarray(pc.fill_null(reason, "").to_pylist(), dtype=object).astype(str),
            return_counts=True,
        )
        for v, c in zip(values, counts):
            self.add(task, v or None, int(c))

    @property
    def bad_fraction(self) -> float:
        return self.rows_quarantined / self.rows_in if self.rows_in else 0.0

    def finish(self) -> ValidationReport:
        """Check row conservation, decide on the threshold and write the message."""
        if self.rows_in != self.rows_clean + self.rows_quarantined:
            raise RuntimeError(
                f"row conservation broken: {self.rows_in} rows in, {self.rows_clean} clean + "
                f"{self.rows_quarantined} quarantined"
            )
        for name, t in self.per_task.items():
            if t.rows_in != t.clean + t.quarantined:
                raise RuntimeError(f"row conservation broken for task {name!r}: {t}")
        unknown = [b for b in self.bad_files if b.rows is None]
        frac = self.bad_fraction
        if self.rows_in == 0:
            self.over_threshold = bool(self.bad_files)
            head = "no readable rows"
        else:
            self.over_threshold = frac > self.max_bad_fraction or bool(unknown)
            head = (
                f"{self.rows_quarantined} of {self.rows_in} rows quarantined ({frac:.2%}, "
                f"max {self.max_bad_fraction:.2%})"
            )
        parts = [head]
        if self.bad_files:
            parts.append(f"{len(self.bad_files)} file problem(s)")
        sections = [", ".join(parts)]
        if unknown:  # first: it refuses the data whatever share was quarantined
            files = "; ".join(f"{b.path} ({b.detail})" for b in unknown)
            sections.insert(
                0,
                f"{len(unknown)} unreadable file(s) of unknown size, so their rows cannot be "
                f"accounted for: {files}",
            )
        verdict = "refused" if self.over_threshold else "ok"
        q = self.quarantine_dir
        where = f"; see {q}" if q and self.rows_quarantined else ""
        self.message = f"{verdict}: " + "; ".join(sections) + where
        return self

    def check(self) -> ValidationReport:
        """Raise ThresholdExceeded when refused (over the threshold, or a file unopened)."""
        if self.over_threshold:
            raise ThresholdExceeded(self)
        return self

    def table(self) -> str:
        """A per-task table, the reason totals, the file problems and the verdict."""
        w = max([len("task"), len("TOTAL"), *(len(t) for t in self.per_task)])
        lines = [f"{'task':<{w}}  {'rows_in':>9}  {'clean':>9}  {'quarantined':>11}  reasons"]
        for name in sorted(self.per_task):
            t = self.per_task[name]
            reasons = " ".join(f"{r}={c}" for r, c in sorted(t.reasons.items()))
            lines.append(
                f"{name:<{w}}  {t.rows_in:>9}  {t.clean:>9}  {t.quarantined:>11}  {reasons}"
            )
        lines.append(
            f"{'TOTAL':<{w}}  {self.rows_in:>9}  {self.rows_clean:>9}  {self.rows_quarantined:>11}  "
            + " ".join(f"{r}={c}" for r, c in sorted(self.per_reason.items()))
        )
        if self.bad_files:
            lines.append("file problems:")
            for b in self.bad_files:
                rows = "rows unknown" if b.rows is None else f"{b.rows} rows"
                lines.append(f"  {b.path}: {b.reason} ({rows}): {b.detail}")
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bad_fraction"] = self.bad_fraction
        return d


# ---------------------------------------------------------------------------------------------
# Files


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _with_columns(table: pa.Table, reason: str, source: str | None = None, task=None) -> pa.Table:
    """Quarantine form: the rows' columns plus reason, source_file and (if absent) task."""
    n = table.num_rows
    # The input's own values of the columns added here are kept, under another name.
    table = table.rename_columns(
        [f"input_{c}" if c in RESERVED_COLUMNS else c for c in table.column_names]
    )
    table = table.append_column("reason", pa.array([reason] * n, pa.string()))
    if source is not None:
        table = table.append_column("source_file", pa.array([source] * n, pa.string()))
    if "task" not in table.column_names:
        table = table.append_column("task", pa.array([task] * n, pa.string()))
    return table


def _text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as utf-8 text: strings kept (invalid bytes as \\x escapes), others rendered."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = pc.cast(col, t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if utf8_valid(col).all():
            return pc.cast(col, pa.string())
        col = pc.cast(col, pa.large_binary())
        t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        values = [
            None if v is None else v.decode("utf-8", "backslashreplace") for v in col.to_pylist()
        ]
        return pa.chunked_array([pa.array(values, pa.string())])
    try:
        return pc.cast(col, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = [None if v is None else str(v) for v in col.to_pylist()]
        return pa.chunked_array([pa.array(values, pa.string())])


def to_quarantine(table: pa.Table) -> pa.Table:
    """Quarantine form: every column as text (nulls kept), whatever the input types were.

    The values stay readable (invalid utf-8 bytes become \\x escapes) and the quarantine
    files of a run share one type per column, so they read together; numbers written as
    text are normalised back by `normalize_table` if the rows are fixed and re-ingested.
    """
    return pa.table([_text(c) for c in table.columns], names=table.column_names)


def check_file(
    src: Source, cfg: ValidationConfig, report: ValidationReport
) -> Iterator[tuple[pa.Table | None, pa.Table | None]]:
    """Validate one file row group by row group, counting into `report`.

    Yields (clean rows, quarantined rows) per readable row group; the quarantined table has
    the file's columns plus `reason`, `source_file` and `task`. Whole-file problems are
    recorded in `report.bad_files`; rows that cannot be read are counted as `unreadable_file`.
    """
    try:
        pf = pq.ParquetFile(src.path)
    except (OSError, pa.ArrowException, ValueError) as e:
        report.bad_files.append(BadFile(src.rel, "unreadable_file", None, _first_line(e)))
        return
    report.add_input(src.task, pf.metadata.num_rows)
    file_reason, detail = _file_problem(src, pf.schema_arrow, cfg)
    if file_reason:
        report.bad_files.append(BadFile(src.rel, file_reason, pf.metadata.num_rows, detail))
    unreadable, error = 0, None
    for i in range(pf.num_row_groups):
        try:
            raw = pf.read_row_group(i)
        except (OSError, pa.ArrowException, ValueError) as e:
            unreadable += pf.metadata.row_group(i).num_rows
            error = error or e
            continue
        if file_reason is None:
            try:
                norm = normalize_table(raw)
            except SchemaMismatch as e:
                file_reason = "schema_mismatch"
                report.bad_files.append(BadFile(src.rel, file_reason, pf.metadata.num_rows, str(e)))
        if file_reason:
            report.add(src.task, file_reason, raw.num_rows)
            yield None, to_quarantine(_with_columns(raw, file_reason, src.rel, src.task))
            continue
        good, bad = split_marked(mark_rows(norm, cfg, src.task))
        report.add(src.task, None, good.num_rows)
        report.add_marked(src.task, bad.column("reason"))
        bad = bad.append_column("source_file", pa.array([src.rel] * bad.num_rows, pa.string()))
        yield good, to_quarantine(bad)
    if unreadable:
        report.rows_unreadable += unreadable
        report.add(src.task, "unreadable_file", unreadable)
        report.bad_files.append(
            BadFile(
                src.rel,
                "unreadable_file",
                unreadable,
                f"row group(s) unreadable: {_first_line(error)}",
            )
        )


def _file_problem(src: Source, schema: pa.Schema, cfg) -> tuple[str | None, str]:
    if src.problem:
        return "invalid_task_name", src.problem
    reserved = [n for n in RESERVED_COLUMNS if n in schema.names]
    if reserved:
        return "reserved_column", (
            f"column(s) {reserved} are names the pipeline adds itself (quarantine reason, "
            "source file, row id); rename them"
        )
    missing = missing_columns(schema, cfg.require_label)
    if missing:
        return "missing_column", f"missing required column(s) {missing}; has {schema.names}"
    problems = {f.name: p for f in schema if (p := type_problem(f.name, f.type))}
    if problems:
        return "schema_mismatch", str(SchemaMismatch(problems))
    return None, ""


class _Sink:
    """A Parquet file written in pieces; a new part file starts when the schema changes."""

    def __init__(self, path: Path):
        self.path = path
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.parts = 0

    def write(self, table: pa.Table | None) -> None:
        if table is None or table.num_rows == 0:
            return
        if self.writer is not None and not table.schema.equals(self.schema, check_metadata=False):
            self.close()
        if self.writer is None:
            path = self.path
            if self.parts:
                path = path.with_name(f"{path.stem}-part{self.parts}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(path, table.schema)
            self.schema = table.schema
            self.parts += 1
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def flat_name(i: int, rel: str) -> str:
    """A unique file name for the i-th source: its path with / -> __, no '=' or separators."""
    name = _UNSAFE.sub("_", rel.replace("/", "__").replace("=", "-"))
    if not name.endswith(".parquet"):
        name += ".parquet"
    return f"{i:05d}-{name}"


VALIDATION_OUTPUT = ("clean", "quarantine", "report.json")


def validate_dir(
    input_dir: str | Path,
    out_dir: str | Path,
    cfg: ValidationConfig | None = None,
    *,
    overwrite: bool = False,
) -> ValidationReport:
    """Validate `input_dir` (the contract layout) into `out_dir`.

    Writes OUT/clean/task=<name>/*.parquet (valid rows, label int8, the task only in the
    directory name), OUT/quarantine/*.parquet
    (rejected rows: original columns as text + reason + source_file + task, see
    `to_quarantine`) and OUT/report.json, all at once (`features.output.staged_output`: an OUT
    that is not empty needs `overwrite` and is then replaced whole), also when the data are
    refused: the quarantined share is over `cfg.max_bad_fraction`, or a file cannot be opened,
    so its rows are neither clean nor quarantined (the report says "refused" and names the
    file: call `.check()` to raise `ThresholdExceeded`). Task directories with invalid names
    are never written to clean/.
    """
    cfg = cfg or ValidationConfig()
    inp, out = Path(input_dir).resolve(), Path(out_dir).resolve()
    sources = discover(inp)
    if not sources:
        raise FileNotFoundError(
            f"no data files under {inp} (expected {inp}/{TASK_DIR_PREFIX}<name>/*.parquet)"
        )
    report = ValidationReport(
        max_bad_fraction=cfg.max_bad_fraction,
        out_dir=str(out),
        quarantine_dir=str(out / "quarantine"),
    )
    owns = VALIDATION_OUTPUT.__contains__
    with staged_output(out, overwrite, owns, "a validation result", inputs=(inp,)) as stage:
        for sub in ("clean", "quarantine"):
            (stage / sub).mkdir()
        for i, src in enumerate(sources):
            clean = None
            if src.task_ok:
                inner = src.rel.split("/", 1)[1]  # the path inside the task directory
                clean = _Sink(
                    stage / "clean" / f"{TASK_DIR_PREFIX}{src.task}" / flat_name(i, inner)
                )
            quarantine = _Sink(stage / "quarantine" / flat_name(i, src.rel))
            try:
                for good, bad in check_file(src, cfg, report):
                    if good is not None and good.num_rows:
                        # The partition directory holds the task (a file column would clash
                        # with it when the tree is read as a Hive dataset).
                        clean.write(to_clean(good).drop_columns(["task"]))
                    quarantine.write(bad)
            finally:
                if clean is not None:
                    clean.close()
                quarantine.close()
        report.finish()
        (stage / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
