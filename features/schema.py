"""The query–ad Parquet contract: the directory layout, the columns and their types, in one place.

Layout: `ROOT/task=<name>/**/*.parquet` (Hive style, several files per task, any row-group
size). Columns: `query`, `ad_title` (required strings), `ad_description` (nullable string),
`label` (0/1; absent for scoring input), optional `grade`, `weight` (float), `query_id`,
`ad_id` (string) and `task` (string, equal to the partition when present). Extra columns are
carried through untouched.

Files written by different producers drift in type (int vs string ids, large_string,
dictionary-encoded strings, int8 vs float labels): `normalize_table` maps every contract
column to one type so that files can be validated, concatenated and read together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from features.tasks import TASK_NAME_RE

TASK_DIR_PREFIX = "task="
REQUIRED_COLUMNS = ("query", "ad_title")
LABEL_COLUMN = "label"
TEXT_COLUMNS = ("query", "ad_title", "ad_description")
ID_COLUMNS = ("query_id", "ad_id")
STRING_COLUMNS = (*TEXT_COLUMNS, *ID_COLUMNS, "task")

# Types after `normalize_table`. The label stays float64 there so that a bad value (2, 0.5,
# NaN) survives for the quarantine; clean files store it as int8 (`to_clean`).
READ_TYPES: dict[str, pa.DataType] = {
    **{c: pa.string() for c in STRING_COLUMNS},
    LABEL_COLUMN: pa.float64(),
    "grade": pa.float32(),
    "weight": pa.float32(),
}
CLEAN_TYPES: dict[str, pa.DataType] = {**READ_TYPES, LABEL_COLUMN: pa.int8()}
CONTRACT_COLUMNS = tuple(READ_TYPES)


class SchemaMismatch(ValueError):
    """Columns whose type cannot be normalised to the contract; `problems` maps column -> why."""

    def __init__(self, problems: dict[str, str]):
        self.problems = dict(problems)
        detail = "; ".join(f"{c}: {p}" for c, p in self.problems.items())
        super().__init__(f"schema mismatch: {detail}")


def required_columns(require_label: bool = True) -> tuple[str, ...]:
    """Columns a file must have: query and ad_title, plus label for training data."""
    return (*REQUIRED_COLUMNS, LABEL_COLUMN) if require_label else REQUIRED_COLUMNS


def missing_columns(schema: pa.Schema, require_label: bool = True) -> list[str]:
    return [c for c in required_columns(require_label) if c not in schema.names]


# ---------------------------------------------------------------------------------------------
# Column types


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _string_ok(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_integer(t)
        or pa.types.is_null(t)
    )


def _number_ok(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
        or pa.types.is_null(t)
    )


def type_problem(column: str, t: pa.DataType) -> str | None:
    """Why `t` can never be normalised to the contract type of `column` (None when it can)."""
    if column not in READ_TYPES:
        return None
    v = _value_type(t)
    if column in STRING_COLUMNS:
        ok = _string_ok(v) or pa.types.is_binary(v) or pa.types.is_large_binary(v)
        want = "a string"
    else:
        ok = _number_ok(v) or pa.types.is_string(v) or pa.types.is_large_string(v)
        want = "a number"
    return None if ok else f"type {t} is not {want}"


def scan_castable(column: str, t: pa.DataType) -> bool:
    """Whether a Parquet scan can cast `t` to the read type without looking at values.

    Binary text (utf-8 unknown) and string-typed numbers (may not parse) need the row-level
    path (`normalize_table` + validation) instead.
    """
    if column not in READ_TYPES:
        return True
    v = _value_type(t)
    return _string_ok(v) if column in STRING_COLUMNS else _number_ok(v)


def _decode(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(arr.type):
        return pc.cast(arr, arr.type.value_type)
    return arr


def _to_string(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    arr = _decode(arr)
    t = arr.type
    if pa.types.is_binary(t):
        # A zero-copy view: utf-8 validity is checked row by row by the validator.
        arr = pa.chunked_array([c.view(pa.string()) for c in arr.chunks], pa.string())
    elif pa.types.is_large_binary(t):
        arr = pa.chunked_array([c.view(pa.large_string()) for c in arr.chunks], pa.large_string())
    if arr.type != pa.string():
        arr = pc.cast(arr, pa.string())  # large_string / string_view / ints / null; no utf-8 check
    return arr


def _to_number(arr: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    arr = _decode(arr)
    if arr.type == target:
        return arr
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return pc.cast(pc.utf8_trim_whitespace(arr), target)  # raises when a value does not parse
    return pc.cast(arr, target, safe=False)


def normalize_table(table: pa.Table) -> pa.Table:
    """Cast every contract column present to its read type; other columns are left untouched.

    Accepts int or string ids, string / large_string / dictionary / binary text, bool, int,
    float or numeric-string labels. Raises `SchemaMismatch` naming every column that cannot
    be normalised (e.g. a float query, a list column, a label "yes").
    """
    problems: dict[str, str] = {}
    columns = []
    for name, col in zip(table.column_names, table.columns):
        target = READ_TYPES.get(name)
        if target is None or col.type == target:
            columns.append(col)
            continue
        why = type_problem(name, col.type)
        if why:
            problems[name] = why
            columns.append(col)
            continue
        try:
            columns.append(_to_string(col) if target == pa.string() else _to_number(col, target))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            problems[name] = f"type {col.type}: {str(e).splitlines()[0]}"
            columns.append(col)
    if problems:
        raise SchemaMismatch(problems)
    return pa.table(columns, names=table.column_names)


def to_clean(table: pa.Table) -> pa.Table:
    """Validated rows in their stored form: label int8 (values already checked to be 0/1)."""
    i = table.schema.get_field_index(LABEL_COLUMN)
    if i >= 0 and table.schema.field(i).type != CLEAN_TYPES[LABEL_COLUMN]:
        table = table.set_column(
            i, LABEL_COLUMN, pc.cast(table.column(i), CLEAN_TYPES[LABEL_COLUMN])
        )
    return table


def read_schema(schemas: list[pa.Schema]) -> tuple[pa.Schema, list[str]]:
    """One schema to read many (scan-castable) files together.

    Contract columns take their read types (files that lack one read it as null); extra
    columns are unified across files and dropped where their types conflict. Returns the
    schema and the names of the dropped extra columns.
    """
    fields = [pa.field(c, t) for c, t in READ_TYPES.items()]
    extras: dict[str, list[pa.DataType]] = {}
    for s in schemas:
        for f in s:
            if f.name not in READ_TYPES:
                extras.setdefault(f.name, []).append(f.type)
    dropped = []
    for name, types in extras.items():
        try:
            unified = pa.unify_schemas(
                [pa.schema([pa.field(name, t)]) for t in types], promote_options="permissive"
            )
            fields.append(unified.field(name))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            dropped.append(name)
    return pa.schema(fields), dropped


# ---------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Source:
    """One data file under a contract root.

    task: the raw partition value (`task=<value>`), None when the file is not under a
    `task=` directory; task_ok: whether that value is a valid task name.
    """

    path: Path
    rel: str
    task: str | None
    task_ok: bool

    @property
    def problem(self) -> str | None:
        if self.task is None:
            return f"not under a {TASK_DIR_PREFIX}<name> directory"
        if not self.task_ok:
            return f"invalid task directory name {self.task!r}"
        return None


def _hidden(name: str) -> bool:
    # Markers and temporary files (_SUCCESS, .crc, _temporary/) are not data.
    return name.startswith((".", "_"))


def discover(root: str | Path, tasks: list[str] | tuple[str, ...] | None = None) -> list[Source]:
    """Every data file under `root`, sorted by relative path, with its task partition.

    Files outside a valid `task=<name>` directory are listed too (task_ok False) so that
    callers report them instead of silently skipping them. With `tasks`, valid partitions
    not in `tasks` are left out (invalid ones are still listed, to be reported).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no data directory at {root}")
    out: list[Source] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if _hidden(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False) and entry.name.startswith(TASK_DIR_PREFIX):
            task = entry.name[len(TASK_DIR_PREFIX) :]
            ok = bool(TASK_NAME_RE.match(task))
        else:
            task, ok = None, False
        if tasks is not None and ok and task not in tasks:
            continue
        for path in _files(Path(entry.path)):
            out.append(Source(path, path.relative_to(root).as_posix(), task, ok))
    return out


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        found += [Path(dirpath) / f for f in sorted(filenames) if not _hidden(f)]
    return found


def list_tasks(root: str | Path) -> list[str]:
    """The valid task names partitioned under `root`, sorted."""
    return sorted({s.task for s in discover(root) if s.task_ok})
