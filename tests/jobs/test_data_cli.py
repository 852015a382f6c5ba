"""`adrel data validate|synth|split`: outputs, the per-task table and exit codes."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from tests.features.crafted import good_rows, write


def test_synth_then_validate_then_split(tmp_path, capsys):
    data = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(data), "--rows-per-task", "80", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "exact_match" in out and "positives" in out and "disagree" in out
    assert main(["data", "validate", "--input", str(data), "--out", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and "ok: 0 of 320 rows quarantined" in out
    assert json.loads((tmp_path / "v/report.json").read_text())["rows_clean"] == 320
    assert main(["data", "split", "--input", str(tmp_path / "v/clean"), "--out", str(tmp_path / "s"),
                 "--fractions", "0.5", "0.25", "0.25"]) == 0  # fmt: skip
    counts = json.loads(capsys.readouterr().out)
    assert sum(sum(t.values()) for t in counts.values()) == 320
    assert (tmp_path / "s/train/task=shopping").is_dir()


def test_validate_exits_2_over_threshold_and_still_writes(tmp_path, capsys):
    rows = good_rows(20)
    rows["query"][0] = "   "
    write(tmp_path / "in/task=shop/p.parquet", rows)
    code = main(
        ["data", "validate", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "refused: 1 of 20 rows quarantined (5.00%, max 1.00%)" in captured.err
    assert "empty_query=1" in captured.out  # the table is printed before the verdict
    assert pq.read_table(tmp_path / "out/quarantine").column("reason").to_pylist() == [
        "empty_query"
    ]
    assert pq.read_metadata(next((tmp_path / "out/clean/task=shop").iterdir())).num_rows == 19
    code = main(["data", "validate", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out2"),
                 "--max-bad-fraction", "0.1"])  # fmt: skip
    assert code == 0


def test_validate_options_and_user_errors(tmp_path, capsys):
    rows = good_rows(4)
    del rows["label"]
    rows["ad_title"][1] = "x" * 50
    write(tmp_path / "in/task=shop/p.parquet", rows)
    args = ["data", "validate", "--input", str(tmp_path / "in"), "--no-label", "--max-text-chars", "40",
            "--max-bad-fraction", "0.5"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    assert "text_too_long=1" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "o")]) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "o2"), "--tasks", "../x"]) == 2
    assert "invalid task name" in capsys.readouterr().err
    assert (
        main(["data", "validate", "--input", str(tmp_path / "none"), "--out", str(tmp_path / "o3")])
        == 2
    )
    assert "no data directory" in capsys.readouterr().err


def test_synth_inventory_without_labels(tmp_path, capsys):
    code = main(["data", "synth", "--out", str(tmp_path / "inv"), "--rows-per-task", "10", "--seed", "1",
                 "--tasks", "shopping", "brand_protect", "--no-label"])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "inv").iterdir()) == [
        "task=brand_protect",
        "task=shopping",
    ]
    table = pq.read_table(tmp_path / "inv/task=shopping", partitioning=None)
    assert "label" not in table.column_names
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(tmp_path / "x"),
                "--rows-per-task",
                "5",
                "--tasks",
                "nope",
            ]
        )
        == 2
    )


def _rows(root) -> int:
    return sum(pq.read_metadata(f).num_rows for f in root.rglob("*.parquet"))


def test_synth_and_split_refuse_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    syn, sp = tmp_path / "syn", tmp_path / "sp1"
    synth = ["data", "synth", "--out", str(syn), "--tasks", "shopping"]
    assert main([*synth, "--rows-per-task", "30", "--files-per-task", "3"]) == 0
    assert main([*synth, "--rows-per-task", "10"]) == 2
    err = capsys.readouterr().err
    assert f"--out {syn} is not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert _rows(syn) == 30  # refused: the first data set is untouched
    assert main([*synth, "--rows-per-task", "10", "--overwrite"]) == 0
    assert _rows(syn) == 10  # replaced whole: the first run's part-2.parquet is gone

    split = ["data", "split", "--input", str(syn), "--out", str(sp)]
    assert main([*split, "--fractions", "0.5", "0.5", "0"]) == 0
    assert _rows(sp / "train") and _rows(sp / "dev")
    capsys.readouterr()
    assert main([*split, "--fractions", "1", "0", "0"]) == 2
    assert f"--out {sp} is not empty" in capsys.readouterr().err
    assert main([*split, "--fractions", "1", "0", "0", "--overwrite"]) == 0
    assert sorted(p.name for p in sp.iterdir()) == ["train"]  # no old dev rows left
    assert _rows(sp / "train") == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sp1", "syn"]  # no staging left


def test_split_failing_part_way_writes_nothing(tmp_path, capsys):
    write(tmp_path / "in/task=shop/a.parquet", good_rows(20))
    (tmp_path / "in/task=shop/b.parquet").write_bytes(b"not parquet")
    assert (
        main(["data", "split", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "sp5")])
        == 2
    )
    assert "b.parquet" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no sp5, no staging left


def test_split_refuses_non_finite_fractions(tmp_path, capsys):
    write(tmp_path / "in/task=shop/a.parquet", good_rows(20))
    code = main(["data", "split", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "sp"),
                 "--fractions", "nan", "0.5", "0.5"])  # fmt: skip
    assert code == 2
    assert "train=nan" in capsys.readouterr().err
    assert not (tmp_path / "sp").exists()


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    write(tmp_path / "in/task=shop/a.parquet", good_rows(20))
    f = tmp_path / "f"
    f.write_text("")
    for args in (
        ["synth", "--rows-per-task", "3", "--tasks", "shopping"],
        ["validate", "--input", str(tmp_path / "in")],
        ["split", "--input", str(tmp_path / "in")],
    ):
        assert main(["data", *args, "--out", str(f)]) == 2, args
        assert f"--out {f} exists and is not a directory" in capsys.readouterr().err
        assert main(["data", *args, "--out", str(f / "sub")]) == 2, args
        assert f"{f} is not a directory" in capsys.readouterr().err
    assert f.read_text() == ""


def test_synth_rows_per_task_has_a_documented_maximum(tmp_path, capsys, monkeypatch):
    import features.synth as synth

    def build(*args, **kwargs):
        raise AssertionError("generated instead of refusing the row count")

    monkeypatch.setattr(synth, "_Generator", build)
    code = main(["data", "synth", "--out", str(tmp_path / "big"), "--rows-per-task", "99999999999"])
    assert code == 2
    assert "rows_per_task must be an integer in [1, " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    assert f"at most {synth.MAX_ROWS_PER_TASK}" in " ".join(capsys.readouterr().out.split())
