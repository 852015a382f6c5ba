"""`adrel evaluate`: summary table, report files, exit 0 / 3 (gate failed) / 2 (bad input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.evaluate import EXIT_GATE_FAILED
from tests.pipeline.test_evaluate import shared_setup

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tiny_encoder_dir, tmp_path_factory):
    """Checkpoint A (labels follow it) and B (unrelated) with a labelled data directory."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared box: avoid thread contention
    s = shared_setup(tiny_encoder_dir, tmp_path_factory)
    yield {k: str(v) for k, v in s.items()}
    torch.set_num_threads(threads)


def test_gate_failure_exits_with_the_distinct_code(models, tmp_path):
    """A real process, as a scheduler runs it: the exit status itself is 3."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "jobs",
        "evaluate",
        "--model",
        models["b"],
        "--baseline",
        models["a"],
    ]
    cmd += ["--data", models["data"], "--out", str(out), "--tasks", "exact"]
    cmd += ["--n-boot", "0", "--no-mlflow", "--quiet", "--min-slice-size", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_GATE_FAILED == 3, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["task", "rows", "ROC-AUC", "ΔROC"]
    row = next(line for line in lines if line.startswith("exact "))
    assert row.split()[1] == "144" and row.rstrip().endswith("FAIL")
    fails = lines.index("exact fails:")
    assert (
        lines[fails + 1].startswith("  - ROC-AUC ")
        and "dropped more than the allowed 0.002" in lines[fails + 1]
    )
    assert "gates: FAIL (exact); exit code 3" in proc.stdout
    for name in ("report.html", "metrics.json", "predictions.parquet"):
        assert (out / name).is_file()  # the report is written also when the gates fail
    assert json.loads((out / "metrics.json").read_text())["gate_failed"] is True


def test_configured_gates_pass_and_exit_zero(models, tmp_path, mlflow_uri, capsys):
    out = tmp_path / "out"
    argv = ["evaluate", "--model", models["b"], "--baseline", models["a"], "--data", models["data"]]
    argv += ["--out", str(out), "--n-boot", "30", "--quiet", "--min-slice-size", "20"]
    argv += ["--tasks", "exact", "brand"]
    argv += ["--gates", "max_roc_auc_drop=1", "max_pr_auc_drop=1", "max_ece_rise=none"]
    argv += ["--threshold", "exact=0.5", "--slice-column", "device", "--tracking-uri", mlflow_uri]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gates: PASS" in printed and "mlflow run:" in printed
    for task in ("exact", "brand"):
        assert any(
            line.startswith(task + " ") and line.rstrip().endswith("PASS")
            for line in printed.splitlines()
        )
    m = json.loads((out / "metrics.json").read_text())
    assert (
        m["config"]["gates"]["max_roc_auc_drop"] == 1.0
        and m["config"]["gates"]["max_ece_rise"] is None
    )
    assert m["config"]["slice_columns"] == ["device"]
    assert m["tasks"]["exact"]["model"]["threshold"] == 0.5
    assert m["tasks"]["exact"]["delta"]["roc_auc"]["delta"] < 0  # worse, but allowed by the gates
    from mlflow import MlflowClient

    run_id = printed.split("mlflow run:")[1].split()[0]
    assert MlflowClient(mlflow_uri).get_run(run_id).data.tags["adrel.eval.verdict"] == "pass"


def test_bad_input_exits_2_with_a_message(models, tmp_path, capsys):
    base = [
        "evaluate",
        "--model",
        models["a"],
        "--data",
        models["data"],
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*base, "--gates", "nope=1", "max_ece=abc", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "unknown gate 'nope'" in err and "max_ece must be a number or none, got 'abc'" in err
    assert main([*base, "--tasks", "missing", "--no-mlflow"]) == 2
    assert "task(s) ['missing'] not found" in capsys.readouterr().err
    assert main([*base, "--threshold", "exact", "--no-mlflow"]) == 2
    assert "not TASK=NUMBER" in capsys.readouterr().err
    assert main([*base, "--threshold", "nosuch=0.5", "--no-mlflow", "--quiet"]) == 2
    assert "threshold(s) given for task(s) ['nosuch'], which are not evaluated" in (
        capsys.readouterr().err
    )
    assert main([*base, "--seed", "-1", "--no-mlflow"]) == 2
    assert "seed must be an integer >= 0, got -1" in capsys.readouterr().err
    for device, text in [
        ("bogus", "use auto, cpu, cuda or cuda:N"),
        ("cuda:64", "this machine has"),
    ]:
        assert main([*base, "--device", device, "--no-mlflow"]) == 2
        assert f"--device '{device}': {text}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # no run above left even an empty output folder
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*base[:-1], str(afile), "--no-mlflow"]) == 2
    assert f"output {afile} is a file, not a directory" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "exit codes: 0 all gates pass, 3 a gate failed" in text and "--baseline" in text
