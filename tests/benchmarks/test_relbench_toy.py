"""The relbench benchmark's cpu protocol at toy size on the tiny encoder (real code path)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "relbench"

pytestmark = pytest.mark.skipif(
    not (DATA / "train").is_dir() or not (DATA / "dev").is_dir(),
    reason=f"relbench data not found at {DATA} (it lives beside the repository, never in it)",
)


def _bench():
    spec = importlib.util.spec_from_file_location("relbench_bench", ROOT / "benchmarks/relbench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cpu_protocol_at_toy_size(tiny_encoder_dir, tmp_path, mlflow_uri, capsys):
    bench = _bench()
    out = tmp_path / "relbench.json"
    argv = ["--protocol", "cpu", "--encoder", str(tiny_encoder_dir), "--data", str(DATA)]
    argv += ["--tasks", "rte", "mrpc", "--variants", "mtl_lora", "lora_task_prefix"]
    argv += ["--seeds", "2", "--max-rows", "24", "--n-boot", "20", "--onboard-task", "rte"]
    argv += ["--max-length", "48"]
    argv += ["--out", str(out), "--workdir", str(tmp_path), "--threads", "1", "--quiet"]
    full = bench.main(argv)

    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["macro_roc_auc"]) == {"mtl_lora", "lora_task_prefix"}
    saved = json.loads(out.read_text())
    assert saved["summary"].keys() == full["summary"].keys()
    assert saved["settings"]["protocol"]["max_length"] == 48
    for res in full["results"].values():
        assert [s["seed"] for s in res["per_seed"]] == [0, 1]
        for s in res["per_seed"]:
            assert set(s["per_task"]) == {"rte", "mrpc"}
            assert len(s["probs"]) == sum(m["rows"] for m in s["per_task"].values()) == 48
            for m in s["per_task"].values():
                assert 0 <= m["roc_auc"] <= 1 and 0 <= m["pr_auc"] <= 1
            assert s["steps"] == 2  # 48 train rows, batch 32, one epoch
    # Task-specific parts: reported for MTL-LoRA (Λ_t moved in step 2, once B was non-zero).
    for s in full["results"]["mtl_lora"]["per_seed"]:
        assert 0 < s["lambda_mean_dev"] <= s["lambda_max_dev"] and 0 < s["mix_max_dev"] < 1
    assert not set(bench.SPREAD_KEYS) & set(full["results"]["lora_task_prefix"]["per_seed"][0])
    summary = full["summary"]
    assert summary["mtl_lora"]["trainable_params"] > summary["lora_task_prefix"]["trainable_params"]
    # Intervals: macro CI for every run, paired delta vs MTL-LoRA for the others.
    lo, hi = summary["mtl_lora"]["macro_roc_auc_ci"]
    assert lo <= hi
    assert summary["mtl_lora"]["delta_roc_auc_ci"] is None
    assert len(summary["lora_task_prefix"]["delta_roc_auc_ci"]) == 2
    # Onboarding: rte held out, then added; the other task's outputs unchanged.
    ob = full["onboarding"]
    assert ob["task"] == "rte" and ob["initial_tasks"] == ["mrpc"]
    assert ob["onboard"]["old_tasks_identical"] is True
    assert ob["onboard"]["trainable_params"] > 0 and not math.isnan(ob["onboard"]["roc_auc"])

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("adrel-relbench")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == last["mlflow_run_id"]]
    assert len(children) == 4  # 2 runs × 2 seeds
    parent = client.get_run(last["mlflow_run_id"])
    assert math.isclose(
        parent.data.metrics["mtl_lora.macro_roc_auc"], summary["mtl_lora"]["macro_roc_auc"]
    )
    arts = {a.path for a in client.list_artifacts(last["mlflow_run_id"])}
    assert {"relbench.json", "relbench.md"} <= arts


def test_resume_keeps_finished_runs(tiny_encoder_dir, tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "r.json"
    base = ["--encoder", str(tiny_encoder_dir), "--data", str(DATA), "--tasks", "rte", "mrpc"]
    base += ["--max-rows", "16", "--n-boot", "10", "--no-onboard", "--no-mlflow", "--quiet"]
    base += ["--out", str(out), "--threads", "1", "--seeds", "1"]
    first = bench.main([*base, "--variants", "heads_only"])
    again = bench.main([*base, "--variants", "heads_only", "lora", "--resume"])
    assert capsys.readouterr().out.count("resuming: 1 run(s) kept") == 1
    assert again["results"]["heads_only"]["per_seed"] == first["results"]["heads_only"]["per_seed"]
    assert len(again["results"]["lora"]["per_seed"]) == 1
    # Resuming with fewer variants keeps the others' finished runs in the file and the table.
    third = bench.main([*base, "--variants", "lora", "--resume"])
    assert third["results"]["heads_only"]["per_seed"] == first["results"]["heads_only"]["per_seed"]
    assert third["results"]["lora"]["per_seed"] == again["results"]["lora"]["per_seed"]
    assert set(json.loads(out.read_text())["summary"]) == {"heads_only", "lora"}
    # --report-only prints the tables of what is there and trains nothing (no `full` run yet).
    shown = bench.main([*base, "--variants", "heads_only", "lora", "full", "--report-only"])
    assert "== " not in capsys.readouterr().out
    assert set(shown["summary"]) == {"heads_only", "lora"}
    assert shown["results"]["lora"]["per_seed"] == third["results"]["lora"]["per_seed"]
    # A run whose adapter settings changed (say a new default) is trained again, not kept.
    bench.RUNS["lora"] = {**bench.RUNS["lora"], "r": 2}
    fourth = bench.main([*base, "--variants", "lora", "--resume"])
    assert "resuming: lora dropped" in capsys.readouterr().out
    assert fourth["results"]["heads_only"]["per_seed"] == first["results"]["heads_only"]["per_seed"]
    assert fourth["results"]["lora"]["adapter"]["r"] == 2
    assert (
        fourth["results"]["lora"]["per_seed"][0]["trainable_params"]
        < third["results"]["lora"]["per_seed"][0]["trainable_params"]
    )
    # Heads only trains two heads of hidden 32 (+ bias): nothing in the encoder.
    assert first["summary"]["heads_only"]["trainable_params"] == 2 * 33


def test_task_spread_reads_mixing_and_lambda(tiny_encoder_dir):
    bench = _bench()
    proto = bench.Protocol("t", encoder=str(tiny_encoder_dir))
    spec = {"variant": "mtl_lora", "r": 4, "n_up": 2, "tau": 0.5}
    model, _ = bench.build(proto, spec, ["a", "b"], seed=0)
    layers = [m for m in model.modules() if hasattr(m, "lora_lambda")]
    with torch.no_grad():
        for m in layers:
            m.lora_w.zero_()  # uniform mixing: every weight 1/2
            m.lora_lambda.fill_(1.0)
        layers[0].lora_w[1] = torch.tensor([0.0, 0.5 * math.log(3.0)])  # softmax(w/0.5) = 1/4, 3/4
        layers[-1].lora_lambda[0, 0] = 1.8
    got = bench.task_spread(model)
    assert math.isclose(got["mix_max_dev"], 0.25, rel_tol=1e-5)
    assert math.isclose(got["lambda_max_dev"], 0.8, rel_tol=1e-5)
    n_lambda = sum(m.lora_lambda.numel() for m in layers)
    assert math.isclose(got["lambda_mean_dev"], 0.8 / n_lambda, rel_tol=1e-4)
    lora, _ = bench.build(proto, {"variant": "lora", "r": 4}, ["a", "b"], seed=0)
    assert bench.task_spread(lora) == {}


def test_full_protocol_selects_on_dev_over_its_epochs(tiny_encoder_dir, tmp_path):
    # The GPU protocol at toy size: all its epochs run, and the kept state is the dev-best one.
    bench = _bench()
    argv = ["--protocol", "full", "--encoder", str(tiny_encoder_dir), "--data", str(DATA)]
    argv += ["--tasks", "rte", "mrpc", "--variants", "mtl_lora", "--seeds", "1"]
    argv += ["--max-rows", "40", "--n-boot", "10", "--no-onboard", "--no-mlflow", "--quiet"]
    argv += ["--out", str(tmp_path / "full.json"), "--threads", "1"]
    res = bench.main(argv)
    run = res["results"]["mtl_lora"]["per_seed"][0]
    assert res["settings"]["protocol"]["epochs"] == 3.0
    assert run["steps"] == math.ceil(3 * 80 / 32)  # 80 train rows, batch 32, three epochs
    # Evaluated once an epoch (every 3 steps) and at the end; the best of those is kept.
    assert run["best_step"] in (3, 6, 8)
    assert len(run["probs"]) == 80
