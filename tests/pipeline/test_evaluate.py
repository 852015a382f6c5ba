"""End-to-end offline evaluation on tiny real checkpoints, real parquet data, real MLflow.

Labels are made from checkpoint A's own scores (plus a little noise), so A is a good model
and B (other random adapter weights) is not: B vs champion A must fail the gates, A vs B
must pass, and the numbers in the report are the ones measured on the same rows.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluate import EvaluationError, evaluate, load_eval_data
from pipeline.predict import load_predictor

TASKS = ("exact", "broad", "brand")
WORDS = [
    "red",
    "blue",
    "green",
    "black",
    "white",
    "nike",
    "adidas",
    "puma",
    "running",
    "trail",
    "shoes",
    "boots",
    "jacket",
    "waterproof",
    "leather",
    "cotton",
    "kids",
    "women",
    "men",
    "size",
    "small",
    "large",
    "cheap",
    "sale",
    "new",
    "gift",
    "phone",
    "case",
    "charger",
    "laptop",
    "bag",
    "desk",
    "lamp",
    "chair",
    "table",
    "garden",
    "hose",
    "drill",
]
FAST = {"progress": False, "log_mlflow": False, "min_slice_size": 30}
SLICES = ["device", "has_description", "query_length"]


# ---------------------------------------------------------------------------- helpers


def write_rows(root: Path, task: str, df: pd.DataFrame, parts: int = 2) -> None:
    """Write one task's rows as `parts` parquet files under root/task=<task>/."""
    d = root / f"task={task}"
    d.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(df)), parts)):
        df.iloc[chunk].to_parquet(d / f"part-{i}.parquet", index=False)


def text_rows(task: str, n_queries: int = 24, per_query: int = 6, seed: int = 0) -> pd.DataFrame:
    """Unlabelled query–ad pairs of one task: query_id, query, ad_title, ad_description."""
    rng = np.random.default_rng(seed + sum(map(ord, task)))
    rows = []
    for q in range(n_queries):
        query = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
        for a in range(per_query):
            title = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))
            desc = " ".join(rng.choice(WORDS, size=8)) if a % 3 else None
            rows.append(
                {
                    "query_id": f"{task}-q{q}",
                    "query": query,
                    "ad_id": f"ad{q}-{a}",
                    "ad_title": title,
                    "ad_description": desc,
                    "device": "mobile" if (q + a) % 2 else "desktop",
                }
            )
    return pd.DataFrame(rows)


def make_checkpoint(encoder_dir, out: Path, seed: int, tasks=TASKS, extra=None) -> Path:
    from models.checkpoint import save_checkpoint
    from tests.models.helpers import tiny_model

    model = tiny_model(encoder_dir, tasks=tasks, seed=seed, r=4, n_up=3, tau=0.5)
    return save_checkpoint(model, out, max_length=48, extra=extra)


def label_with(predictor, task: str, df: pd.DataFrame, noise: float, seed: int) -> pd.DataFrame:
    """Labels = the predictor's score above the task median, `noise` share flipped; grades 0-3."""
    p = predictor.predict(df, task)
    rng = np.random.default_rng(seed)
    label = (p > np.median(p)).astype(np.int64)
    flip = rng.random(len(p)) < noise
    label[flip] = 1 - label[flip]
    out = df.copy()
    out["label"] = label
    out["grade"] = (label * 2 + (rng.random(len(p)) < 0.5)).astype(np.float32)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Scoring tiny models on a shared 2-core box: one thread avoids contention stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_SHARED: dict = {}


def shared_setup(encoder_dir, tmp_path_factory) -> dict:
    """Checkpoints A (good: labels follow it) and B (unrelated), and the labelled data.

    Built once per session and shared with the CLI tests (building costs more than a test).
    """
    if "a" not in _SHARED:
        root = tmp_path_factory.mktemp("eval")
        a = make_checkpoint(encoder_dir, root / "ckpt-a", seed=1)
        b = make_checkpoint(encoder_dir, root / "ckpt-b", seed=2)
        pa = load_predictor(a)
        data = root / "data"
        for i, task in enumerate(TASKS):
            write_rows(data, task, label_with(pa, task, text_rows(task), noise=0.08, seed=i))
        _SHARED.update(a=a, b=b, data=data, root=root)
    return dict(_SHARED)


@pytest.fixture(scope="module")
def setup(tiny_encoder_dir, tmp_path_factory):
    return shared_setup(tiny_encoder_dir, tmp_path_factory)


# ---------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def worse(setup, tmp_path_factory):
    """Challenger B against champion A (the worse model challenging the better one)."""
    out = tmp_path_factory.mktemp("worse")
    res = evaluate(
        setup["b"], setup["data"], out, baseline=setup["a"], **FAST, n_boot=60, slice_column=SLICES
    )
    return res, out


def test_challenger_worse_than_champion_fails_gates(worse):
    res, out = worse
    assert res.gate_failed and res.failed_tasks == sorted(TASKS)
    assert set(res.verdicts) == set(TASKS)
    for task, v in res.verdicts.items():
        assert not v.passed and v.mode == "relative"
        assert any("ROC-AUC" in r and "dropped" in r for r in v.reasons), (task, v.reasons)
        d = res.metrics["tasks"][task]["delta"]["roc_auc"]
        lo, hi = d["ci"]
        assert d["delta"] < -0.2 and lo <= d["delta"] <= hi and hi < 0  # a significant drop
    assert res.metrics["macro"]["delta"]["roc_auc"]["delta"] < 0
    assert res.metrics["macro"]["delta"]["roc_auc"]["ci"][1] < 0


def test_report_has_every_task_and_verdict(worse):
    res, out = worse
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "Gates: FAIL" in html
    for task in TASKS:
        assert f"<b>{task}</b>" in html
        verdict_row = f"<td class='l'><b>{task}</b></td><td><span class='tag fail'>FAIL</span></td>"
        assert verdict_row in html.split("Gate verdicts")[1]
    assert "Champion vs challenger" in html and "dropped more than the allowed 0.002" in html
    assert html.count("data:image/png;base64,") == len(TASKS) + 2  # curves + 2 diagnostics
    assert "src='http" not in html and "<script" not in html  # one self-contained file

    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads(json.dumps(res.metrics))  # the file is what the result holds
    assert m["gate_failed"] is True and m["verdicts"] == {t: "fail" for t in TASKS}
    for task in TASKS:
        e = m["tasks"][task]
        for who in ("model", "baseline"):
            for k in ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "f1", "ndcg@5", "ndcg@10"):
                assert isinstance(e[who][k], float), (task, who, k)
            assert e[who]["rows"] == 144 and e[who]["queries"] == 24
            lo, hi = e[who]["roc_auc_ci"]
            assert lo <= e[who]["roc_auc"] <= hi
        assert e["verdict"]["verdict"] == "fail" and e["verdict"]["reasons"]
    assert set(m["macro"]["model"]) >= {"roc_auc", "pr_auc", "ece", "f1", "ndcg@5"}


def test_report_screenshot_in_headless_chromium(worse, tmp_path):
    """The report renders in a real browser to a non-blank page (the script used to look at it)."""
    import importlib.util

    from PIL import Image

    script = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        mod.find_chromium()
    except FileNotFoundError as exc:
        pytest.skip(f"no headless Chromium here: {exc}")
    png = mod.screenshot(worse[1] / "report.html", tmp_path / "report.png", 1400, 2000)
    im = Image.open(png).convert("L")
    assert im.size == (1400, 2000)
    lo, hi = im.getextrema()
    assert hi - lo > 200  # text and plots, not a blank page
    assert len(set(im.resize((140, 200)).getdata())) > 20


def test_same_rows_scored_for_both_models(setup, worse):
    res, out = worse
    preds = pd.read_parquet(out / "predictions.parquet")
    data = load_eval_data(setup["data"]).rows
    assert preds["row_id"].is_unique and len(preds) == len(data) == 3 * 144
    assert sorted(preds["row_id"]) == sorted(data["row_id"])
    assert {"task", "label", "score", "baseline_score"} <= set(preds.columns)
    # Each column is that model's own score of that very row (matched by row id).
    pa, pb = load_predictor(setup["a"]), load_predictor(setup["b"])
    merged = data.merge(preds[["row_id", "score", "baseline_score", "label"]], on="row_id")
    assert (merged["label_x"] == merged["label_y"]).all()
    for task, df in merged.groupby("task"):
        np.testing.assert_allclose(df["baseline_score"], pa.predict(df, task), atol=1e-6)
        np.testing.assert_allclose(df["score"], pb.predict(df, task), atol=1e-6)


def test_slices(worse):
    res, out = worse
    s = res.metrics["slices"]["exact"]
    assert {e["value"] for e in s["device"]} == {"mobile", "desktop"}
    assert sum(e["rows"] for e in s["device"]) == 144
    assert {e["value"] for e in s["has_description"]} == {"with description", "no description"}
    assert sum(e["rows"] for e in s["query_length"]) == 144
    for e in s["device"]:
        assert isinstance(e["model"]["roc_auc"], float) and isinstance(e["delta_roc_auc"], float)
    small = [e for e in s["query_length"] if e["rows"] < 30]
    assert all(e["note"] == "fewer than 30 rows" and "model" not in e for e in small)
    html = (out / "report.html").read_text()
    for col in SLICES:
        assert f"By {col}" in html


def test_mtl_lora_diagnostics(worse):
    res, out = worse
    diag = res.metrics["diagnostics"]
    assert diag["tasks"] == list(TASKS) and diag["n_up"] == 3
    assert len(diag["layers"]) == 12  # 2 layers x 6 target linears
    for layer in diag["layers"]:
        mix = np.asarray(layer["mixing"])
        assert mix.shape == (3, 3)
        np.testing.assert_allclose(mix.sum(1), 1.0, atol=1e-5)
        cos = np.asarray(layer["lambda_cos"])
        np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-5)
        assert (np.abs(cos - np.eye(3)) > 1e-4).any()  # perturbed Λ_t differ between tasks
    assert "softmax(w<sub>t</sub>/τ)" in (out / "report.html").read_text()


def test_first_model_thresholds_quarantine_and_new_mlflow_run(setup, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    bad = text_rows("exact", n_queries=2, per_query=3, seed=9)
    bad["label"] = [1, 0, 2, 1, 0, 1]
    bad.loc[1, "query"] = None
    bad.loc[3, "ad_title"] = "   "
    bad.to_parquet(data / "task=exact" / "part-9.parquet", index=False)
    write_rows(data, "other", text_rows("other", 2, 2).assign(label=1), parts=1)  # not in model
    res = evaluate(
        setup["a"],
        data,
        tmp_path / "o",
        progress=False,
        n_boot=0,
        thresholds={"exact": 0.5},
        threshold_data=str(setup["data"]),
    )
    # No champion: absolute bars. A ranks well (the labels follow it) but is not calibrated
    # (labels cut at its median score): the ROC-AUC bar passes, the ECE bar fails.
    assert res.gate_failed and {v.mode for v in res.verdicts.values()} == {"absolute"}
    for v in res.verdicts.values():
        failed = [c for c in v.checks if not c.passed]
        assert [c.gate for c in failed] == ["max_ece"], v.reasons
        assert "misses the bar <= 0.15" in failed[0].message
        assert any(c.gate == "min_roc_auc" and c.passed for c in v.checks)
    t = res.metrics["tasks"]
    assert (t["exact"]["model"]["threshold"], t["exact"]["model"]["threshold_source"]) == (
        0.5,
        "given",
    )
    assert t["broad"]["model"]["threshold_source"] == "best F1 on dev"
    assert t["exact"]["model"]["rows"] == 144 + 3

    d = res.metrics["data"]
    assert d["rows_read"] == 3 * 144 + 6 + 4
    assert d["rows_evaluated"] + d["rows_quarantined"] == d["rows_read"]
    assert d["quarantine_reasons"] == {
        "null_query": 1,
        "label_not_binary": 1,
        "empty_ad_title": 1,
        "task_not_in_model": 4,
    }
    assert d["skipped_tasks"] == {"other": "not a task of the model"}
    q = pd.read_parquet(res.paths["quarantine"])
    assert len(q) == 7 and q["row_id"].is_unique and q["reason"].notna().all()

    # A local checkpoint with no run of its own: a new evaluation run holds the results.
    run = MlflowClient(mlflow_uri).get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["adrel.eval.verdict"] == "fail"
    assert run.data.metrics["eval.gate_failed"] == 1.0
    assert math.isclose(run.data.metrics["eval.exact.roc_auc"], t["exact"]["model"]["roc_auc"])
    assert "eval.macro.ndcg_at_5" in run.data.metrics
    # Its artifacts sit beside the sqlite store, not in whatever directory the process ran in.
    exp = MlflowClient(mlflow_uri).get_experiment(run.info.experiment_id)
    assert exp.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()


def test_mlflow_uris_and_logging_to_the_models_run(setup, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    run = client.create_run(
        client.create_experiment("train", artifact_location=(tmp_path / "art").as_uri())
    )
    run_id = run.info.run_id
    client.log_artifacts(run_id, str(setup["a"]), "checkpoint")
    client.set_terminated(run_id)
    client.create_registered_model("adrel-mtl")
    version = client.create_model_version("adrel-mtl", f"runs:/{run_id}/checkpoint", run_id=run_id)
    client.set_registered_model_alias("adrel-mtl", "champion", version.version)

    # Challenger by run URI, champion by registered alias: the same checkpoint A twice.
    res = evaluate(
        f"runs:/{run_id}/checkpoint",
        setup["data"],
        tmp_path / "o",
        baseline="models:/adrel-mtl@champion",
        tasks=["exact"],
        progress=False,
        n_boot=20,
        slice_column=[],
    )
    assert res.metrics["model"]["kind"] == res.metrics["baseline"]["kind"] == "checkpoint"
    assert res.metrics["baseline"]["registered_version"] == str(version.version)
    assert not res.gate_failed
    for e in res.metrics["tasks"].values():  # identical models: zero deltas, zero-width CIs
        for d in e["delta"].values():
            assert d["delta"] == 0.0 and d["ci"] == [0.0, 0.0]
    assert res.mlflow_run_id == run_id  # logged to the evaluated model's own run
    logged = client.get_run(run_id).data
    assert math.isclose(
        logged.metrics["eval.exact.roc_auc"], res.metrics["tasks"]["exact"]["model"]["roc_auc"]
    )
    assert logged.metrics["eval.exact.delta_roc_auc"] == 0.0
    assert logged.metrics["eval.gate_failed"] == 0.0
    names = {f.path for f in client.list_artifacts(run_id, "evaluation")}
    assert {
        "evaluation/report.html",
        "evaluation/metrics.json",
        "evaluation/predictions.parquet",
    } <= names


def test_export_champion_with_fewer_tasks(setup, tiny_encoder_dir, tmp_path):
    """Champion = an export of only `exact` (as `models:/<prefix>@champion` resolves to);
    challenger = the same model as a checkpoint that also has `brand` (a task added since)."""
    from pipeline.export import ExportConfig, export_checkpoint

    # Checkpoint A again (same seeds), now with a decision threshold in its metadata.
    extra = {"thresholds": {"exact": 0.42}}
    ckpt = make_checkpoint(tiny_encoder_dir, tmp_path / "ckpt", seed=1, extra=extra)
    export_checkpoint(ckpt, tmp_path / "export", ExportConfig(tasks=["exact"], optimize=False))
    res = evaluate(
        ckpt, setup["data"], tmp_path / "o", baseline=tmp_path / "export", tasks=["exact", "brand"],
        **FAST, n_boot=20, slice_column=[],
    )  # fmt: skip
    assert (res.metrics["model"]["kind"], res.metrics["baseline"]["kind"]) == (
        "checkpoint",
        "export",
    )
    preds = pd.read_parquet(res.paths["predictions"])
    exact, brand = preds[preds["task"] == "exact"], preds[preds["task"] == "brand"]
    assert len(exact) == len(brand) == 144
    assert (exact["score"] - exact["baseline_score"]).abs().max() < 1e-4  # ORT == PyTorch
    assert brand["baseline_score"].isna().all() and brand["score"].notna().all()

    e = res.metrics["tasks"]["exact"]
    assert abs(e["delta"]["roc_auc"]["delta"]) < 1e-3 and res.verdicts["exact"].mode == "relative"
    for who in ("model", "baseline"):  # the export carries the checkpoint's threshold
        assert (e[who]["threshold"], e[who]["threshold_source"]) == (0.42, "model metadata")
    b = res.metrics["tasks"]["brand"]
    assert b["delta"] is None and b["baseline"] is None and res.verdicts["brand"].mode == "absolute"
    html = (tmp_path / "o" / "report.html").read_text()
    assert "no champion for this task: judged on absolute bars" in html


def test_errors_name_the_problem(setup, tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate(setup["a"], tmp_path / "missing", tmp_path / "o", **FAST)
    with pytest.raises(EvaluationError, match=r"task\(s\) \['nope'\] not found .*; it has \['"):
        evaluate(setup["a"], setup["data"], tmp_path / "o", **FAST, tasks=["nope"])
    with pytest.raises(ValueError, match="neither an existing directory nor an MLflow URI"):
        evaluate(tmp_path / "nowhere", setup["data"], tmp_path / "o", **FAST)
    with pytest.raises(EvaluationError, match="slice column"):
        evaluate(setup["a"], setup["data"], tmp_path / "o", **FAST, slice_column="nope")
    with pytest.raises(TypeError, match="unknown option"):
        evaluate(setup["a"], setup["data"], tmp_path / "o", bogus=1)
    # Files without a label column: every row is quarantined, so nothing can be evaluated.
    nolabel = tmp_path / "nolabel" / "task=exact"
    nolabel.mkdir(parents=True)
    pd.DataFrame({"query": ["q"], "ad_title": ["t"]}).to_parquet(nolabel / "p.parquet")
    with pytest.raises(
        EvaluationError, match=r"none of the 1 rows .* \{'missing_label_column': 1\}"
    ):
        evaluate(setup["a"], nolabel.parent, tmp_path / "o", **FAST)
    assert not (tmp_path / "o").exists()


def test_a_file_with_the_reports_own_columns_is_quarantined_with_its_values(setup, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    mine = text_rows("exact", n_queries=1, per_query=3, seed=4).assign(label=[1, 0, 1])
    mine["reason"] = ["a", None, "c"]
    mine["row_id"] = [10, 11, 12]
    mine.to_parquet(data / "task=exact" / "part-mine.parquet", index=False)
    res = evaluate(setup["a"], data, tmp_path / "o", **FAST, n_boot=0)
    assert res.metrics["data"]["quarantine_reasons"] == {"reserved_column": 3}
    q = pd.read_parquet(res.paths["quarantine"])
    assert sorted(float(v) for v in q["input_row_id"]) == [10, 11, 12]  # kept (as text)
    assert sorted(q["input_reason"].dropna()) == ["a", "c"] and q["row_id"].is_unique
