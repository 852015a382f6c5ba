"""`adrel export`, `adrel promote`, `adrel models` end to end (in-process CLI, real MLflow/ORT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipeline.export as export_mod
from jobs.cli import main
from tests.pipeline.test_export import TASKS, make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tiny_encoder_dir, tmp_path_factory):
    return make_checkpoint(tiny_encoder_dir, tmp_path_factory.mktemp("cli") / "ckpt")


def test_export_subset_from_a_directory(ckpt, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--tasks", "a,c"]) == 0
    assert json.loads((out / "index.json").read_text())["tasks"] == ["a", "c"]
    stdout = capsys.readouterr().out
    assert "exported 2 task(s)" in stdout and "pass" in stdout


def test_broken_merge_exits_non_zero_and_publishes_nothing(ckpt, tmp_path, capsys, monkeypatch):
    def forgetful_merge(model, task):  # drops task b's ΔW in one layer
        from tests.pipeline.test_export import _drop_one_layer

        return _drop_one_layer(model, task)

    monkeypatch.setattr(export_mod, "_merge", forgetful_merge)
    out = tmp_path / "export"
    rc = main(["export", "--model", str(ckpt), "--out", str(out), "--tasks", "b"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "parity gate failed for task 'b'" in err and "batch=" in err and "seq=" in err
    assert "nothing was published" in err
    assert not out.exists()


def test_user_errors(ckpt, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["export", "--model", str(ckpt), "--out", out, "--quantize", "int8"]) == 2
    assert "--validation" in capsys.readouterr().err
    assert main(["export", "--model", str(ckpt), "--out", out, "--tasks", "a,zzz"]) == 2
    assert "unknown task(s) ['zzz']" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", out]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["export", "--model", "models:/x/abc", "--out", out]) == 2
    assert "not a number" in capsys.readouterr().err
    # Output problems are bad usage (2), not a refused gate (3), and are found before any work.
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["export", "--model", str(ckpt), "--out", str(afile)]) == 2
    assert "exists and is not an adrel export" in capsys.readouterr().err
    inside = ckpt / "sub"
    assert main(["export", "--model", str(ckpt), "--out", str(inside)]) == 2
    assert "is inside the checkpoint" in capsys.readouterr().err
    assert not inside.exists()
    reg = ["export", "--model", str(ckpt), "--out", out, "--register"]
    assert main([*reg, "--prefix", "a/b", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    assert "invalid registered-model prefix 'a/b'" in capsys.readouterr().err
    assert main([*reg, "--tracking-uri", "bogus://x"]) == 2
    assert "the MLflow store at bogus://x cannot be used" in capsys.readouterr().err
    assert not Path(out).exists()  # refused before the export


def test_register_promote_and_list(ckpt, tmp_path, capsys, mlflow_uri, monkeypatch):
    monkeypatch.setenv("ADREL_MODEL_CACHE", str(tmp_path / "cache"))
    from pipeline.registry import register_checkpoint

    register_checkpoint(ckpt)  # adrel-mtl v1: export straight from the registry
    out = tmp_path / "export"
    rc = main(
        ["export", "--model", "models:/adrel-mtl@challenger", "--out", str(out), "--register"]
    )
    stdout = capsys.readouterr().out
    assert rc == 0
    for t in TASKS:
        assert f"registered adrel-{t} version 1 (alias challenger)" in stdout
    meta = json.loads((out / "a" / "meta.json").read_text())
    assert meta["source_registered_model"] == "adrel-mtl"
    assert meta["source_registered_version"] == "1" and meta["source_run_id"]

    rc = main(["promote", "--task", "a", "--version", "1", "--reason", "first", "--actor", "ci"])
    assert rc == 0
    assert "adrel-a: champion (none) -> 1 by ci" in capsys.readouterr().out
    assert main(["promote", "--task", "a", "--version", "5"]) == 2
    assert "no version '5'" in capsys.readouterr().err

    # a local checkpoint with --register: registered once as adrel-mtl (same weights: v1)
    rc = main(["export", "--model", str(ckpt), "--out", str(tmp_path / "e3"), "--register"])
    stdout = capsys.readouterr().out
    assert rc == 0 and "checkpoint: adrel-mtl version 1" in stdout
    assert "registered adrel-a version 2" in stdout

    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "adrel-a  [task]  challenger=v2, champion=v1" in listing
    assert "adrel-mtl  [mtl]  challenger=v1" in listing
    assert main(["models", "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)]
    assert names == ["adrel-a", "adrel-b", "adrel-c", "adrel-mtl"]

    from serving.scorer import load_scorers

    assert sorted(load_scorers("models:/adrel@champion")) == ["a"]
