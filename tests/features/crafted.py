"""Hand-crafted contract directories for the data tests: good rows and one file per reason."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write(path: Path, table: pa.Table | dict, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, dict):
        table = pa.table(table)
    pq.write_table(table, path, **kwargs)
    return path


def good_rows(n: int, prefix: str = "q", start: int = 0) -> dict:
    """n valid rows with every optional column and an extra one."""
    idx = range(start, start + n)
    return {
        "query_id": [f"{prefix}{i}" for i in idx],
        "query": [f"{prefix} red running shoes {i}" for i in idx],
        "ad_id": [f"ad{i}" for i in idx],
        "ad_title": [f"Strideon Red Running Shoes {i}" for i in idx],
        "ad_description": [None if i % 3 == 0 else f"Mesh upper, size {i % 5 + 7}." for i in idx],
        "label": pa.array([i % 2 for i in idx], pa.int8()),
        "grade": pa.array([float(i % 4) for i in idx], pa.float32()),
        "weight": pa.array([1.0 + (i % 2) for i in idx], pa.float32()),
        "campaign": [f"c{i % 7}" for i in idx],
    }


def bad_utf8(text: bytes) -> pa.Array:
    """A string array holding invalid utf-8 (as a careless writer produces)."""
    return pa.array([text], pa.binary()).view(pa.string())


def corrupt_row_group(path: Path, row_group: int) -> None:
    """Overwrite the first page header of a row group: the footer stays readable."""
    col = pq.read_metadata(path).row_group(row_group).column(0)
    off = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    data[off : off + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))


# reason -> (relative path, table, config overrides it needs); every file holds exactly one
# bad row (plus one good row where the reason is per row) unless said otherwise.
def reason_files(root: Path) -> dict[str, tuple[str, int]]:
    """Write one crafted file per quarantine reason under `root`; returns reason -> (rel, bad rows).

    Validate with known_tasks=("shop", "brand") and max_text_chars=50.
    """
    ok = {"query": "ok query", "ad_title": "ok title", "label": 1}

    def rows(bad: dict, good: bool = True) -> pa.Table:
        cols = {k: [bad.get(k, ok[k])] + ([ok[k]] if good else []) for k in ok}
        for k, v in bad.items():
            if k not in ok:
                cols[k] = [v] + ([v] if good else [])
        return pa.table(cols)

    files = {
        "null_query": ("task=shop/null_query.parquet", rows({"query": None})),
        "empty_query": ("task=shop/empty_query.parquet", rows({"query": " \t\n "})),
        "null_ad_title": ("task=shop/null_title.parquet", rows({"ad_title": None})),
        "empty_ad_title": ("task=shop/empty_title.parquet", rows({"ad_title": "   "})),
        "label_not_binary": ("task=shop/label2.parquet", rows({"label": 2})),
        "null_label": (
            "task=shop/null_label.parquet",
            pa.table({"query": ["a", "b"], "ad_title": ["t", "t"], "label": [None, 1.0]}),
        ),
        "text_too_long": ("task=shop/long.parquet", rows({"ad_title": "x" * 51})),
        "bad_weight": (
            "task=shop/weight.parquet",
            pa.table(
                {
                    "query": ["a", "b"],
                    "ad_title": ["t", "t"],
                    "label": [1, 0],
                    "weight": [-1.0, 1.0],
                }
            ),
        ),
        "task_mismatch": (
            "task=shop/mismatch.parquet",
            pa.table(
                {
                    "query": ["a", "b"],
                    "ad_title": ["t", "t"],
                    "label": [1, 0],
                    "task": ["brand", "shop"],
                }
            ),
        ),
        "unknown_task": ("task=other/unknown.parquet", rows({}, good=False)),
        "invalid_utf8": (
            "task=shop/utf8.parquet",
            pa.table(
                {
                    "query": pa.concat_arrays([bad_utf8(b"caf\xe9 shoes"), pa.array(["fine"])]),
                    "ad_title": ["t", "t"],
                    "label": [1, 0],
                }
            ),
        ),
        "schema_mismatch": (
            "task=shop/mismatch_type.parquet",
            pa.table({"query": ["a", "b"], "ad_title": ["t", "t"], "label": ["yes", "no"]}),
        ),
        "missing_column": (
            "task=brand/no_title.parquet",
            pa.table({"query": ["a", "b"], "label": [1, 0]}),
        ),
        "invalid_task_name": ("task=../x/injected.parquet", rows({}, good=False)),
        "reserved_column": ("task=shop/reserved.parquet", rows({"source_file": "mine"})),
    }
    bad_counts = {
        "unknown_task": 1,
        "schema_mismatch": 2,
        "missing_column": 2,
        "invalid_task_name": 1,
        "reserved_column": 2,
    }
    out = {}
    for reason, (rel, table) in files.items():
        write(root / rel, table)
        out[reason] = (rel, bad_counts.get(reason, 1))
    # A file whose rows are only partly readable: 2 row groups of 3, the second corrupt.
    path = write(
        root / "task=brand/corrupt.parquet",
        rows({}, good=True).take([0, 1, 0, 1, 0, 1]),
        row_group_size=3,
    )
    corrupt_row_group(path, 1)
    out["unreadable_file"] = ("task=brand/corrupt.parquet", 3)
    return out
