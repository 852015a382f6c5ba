"""Onboarding a new task: old tasks stay bit-identical, only the new task's rows train."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from features.tasks import TaskRegistry
from jobs.cli import main as cli_main
from models.adapters import ADAPTERS
from models.checkpoint import load_checkpoint, read_config, save_checkpoint
from models.merge import merge_task
from pipeline.onboard import (
    OnboardError,
    add_task,
    extend_model,
    onboard,
    onboard_config,
    task_axis_keys,
)
from tests.models.helpers import tiny_model, token_batch

OLD = ("exact", "broad", "brand")
FAST = ["optim.max_steps=6", "eval.every_steps=3", "optim.batch_size=8"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; on a loaded shared box, threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    words = ["shoe", "tv", "phone", "lamp", "sofa", "bike"]
    q = rng.choice(words, n)
    same = rng.random(n) < 0.5
    title = np.where(same, q, rng.choice(words, n))
    return pd.DataFrame(
        {
            "query_id": [f"q{i // 2}" for i in range(n)],
            "query": [f"cheap {w}" for w in q],
            "ad_title": [f"best {w} deal" for w in title],
            "ad_description": [None] * n,
            "label": same.astype(np.int8),
        }
    )


def _write(root, task: str, df: pd.DataFrame) -> None:
    d = root / f"task={task}"
    d.mkdir(parents=True)
    df.to_parquet(d / "part-0.parquet", index=False)


@pytest.fixture
def trained(tiny_encoder_dir, tmp_path):
    model = tiny_model(tiny_encoder_dir, tasks=OLD, r=4, n_up=2)
    ckpt = save_checkpoint(
        model,
        tmp_path / "ckpt",
        max_length=32,
        tokenizer_from=tiny_encoder_dir,
        extra={"thresholds": {"exact": 0.5}},
    )
    data = tmp_path / "data"
    _write(data / "train", "fresh", _rows(40, 0))
    _write(data / "dev", "fresh", _rows(16, 1))
    return ckpt, data


def _old_logits(model) -> torch.Tensor:
    ids, mask, types = token_batch(batch=6, seq=14)
    task_ids = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        return model.eval()(ids, mask, task_ids, types)


def test_add_task_keeps_old_tasks_bit_identical(trained, tmp_path):
    ckpt, data = trained
    before, _ = load_checkpoint(ckpt)
    report = add_task(ckpt, "fresh", data, tmp_path / "out", overrides=FAST, log=None)
    after, cfg = load_checkpoint(tmp_path / "out")
    # Registry: old ids kept, the new task gets the next id.
    assert after.tasks.names == [*OLD, "fresh"] and report.task_id == 3
    assert all(after.tasks.id(t) == before.tasks.id(t) for t in OLD)
    assert torch.equal(_old_logits(before), _old_logits(after))
    # Only the new task's rows moved: shared tensors and old rows are exactly the old ones.
    old_p, new_p = dict(before.named_parameters()), dict(after.named_parameters())
    axis = set(task_axis_keys(after))
    for key, p in new_p.items():
        if key in axis:
            assert torch.equal(p[:3], old_p[key]), key
        else:
            assert torch.equal(p, old_p[key]), key
    assert not torch.equal(after.head_weight[3], torch.zeros_like(after.head_weight[3]))
    # What trained: Λ_t (r) and w_t (n) in each of 12 layers, plus one head row (H + 1).
    r, n, H = 4, 2, after.encoder.config.hidden_size
    assert report.trainable_params == 12 * (r + n) + H + 1
    assert report.steps == 6 and report.train_rows == 40 and report.dev_rows == 16
    assert 0.0 <= report.dev_auc <= 1.0
    # An ordinary checkpoint: old metadata kept, the onboarding recorded, the merge works.
    assert cfg["extra"]["thresholds"] == {"exact": 0.5}
    assert cfg["extra"]["onboarded"][0]["task"] == "fresh"
    ids, mask, types = token_batch(batch=3)
    with torch.no_grad():
        ref = after(ids, mask, torch.full((3,), 3), types)
        out = merge_task(after, "fresh")(ids, mask, types)
    assert (out - ref).abs().max().item() <= 1e-5


def test_new_task_rows_really_train(trained, tmp_path):
    ckpt, data = trained
    model, _ = load_checkpoint(ckpt)
    fresh = extend_model(model, "fresh")
    add_task(ckpt, "fresh", data, tmp_path / "out", overrides=FAST, log=None)
    after, _ = load_checkpoint(tmp_path / "out")
    layer = next(iter(after.adapter_layers()))
    key = f"encoder.{layer}.lora_lambda"
    init, trained_row = (
        dict(fresh.named_parameters())[key][3],
        dict(after.named_parameters())[key][3],
    )
    assert not torch.equal(init, trained_row)


def test_train_shared_also_moves_shared_parts(trained, tmp_path):
    ckpt, data = trained
    before, _ = load_checkpoint(ckpt)
    add_task(ckpt, "fresh", data, tmp_path / "out", FAST, train_shared=True, log=None)
    after, _ = load_checkpoint(tmp_path / "out")
    layer = next(iter(after.adapter_layers()))
    key = f"encoder.{layer}.lora_A"
    assert not torch.equal(
        dict(after.named_parameters())[key], dict(before.named_parameters())[key]
    )
    old_p = dict(before.named_parameters())
    assert torch.equal(after.head_weight[:3], old_p["head_weight"])  # old rows still restored


@pytest.mark.parametrize("variant", sorted(ADAPTERS))
def test_extend_model_keeps_every_variant_identical(tiny_encoder_dir, variant):
    model = tiny_model(tiny_encoder_dir, tasks=OLD, variant=variant, r=4, n_up=2)
    grown = extend_model(model, "fresh")
    assert grown.num_tasks == 4 and grown.adapter_cfg.num_tasks == 4
    assert torch.equal(_old_logits(model), _old_logits(grown))
    assert model.num_tasks == 3  # the source model is untouched


def test_bad_rows_are_quarantined_with_their_reason(trained, tmp_path):
    ckpt, data = trained
    bad = _rows(6, 3)
    bad.loc[1, "query"] = " "
    bad.loc[4, "label"] = 2
    (data / "train" / "task=fresh" / "part-1.parquet").parent.mkdir(exist_ok=True)
    bad.to_parquet(data / "train" / "task=fresh" / "part-1.parquet", index=False)
    report = add_task(ckpt, "fresh", data, tmp_path / "out", overrides=FAST, log=None)
    q = pd.read_parquet(tmp_path / "out.quarantine" / "train.parquet")
    assert report.quarantined == 2 and report.train_rows == 44
    assert sorted(q["reason"]) == ["label must be 0 or 1, got 2.0", "query is empty"]


def test_refuses_existing_task_and_foreign_rows(trained, tiny_encoder_dir):
    ckpt, data = trained
    model, _ = load_checkpoint(ckpt)
    with pytest.raises(OnboardError, match="already exists"):
        extend_model(model, "broad")
    cfg = onboard_config(data, FAST)
    n = 8
    arrays = {
        "input_ids": np.full((n, 6), 1000, dtype=np.int64),
        "attention_mask": np.ones((n, 6), dtype=np.int64),
        "token_type_ids": np.zeros((n, 6), dtype=np.int64),
        "task_id": np.array([3] * 5 + [1] + [3] * 2),
        "label": np.zeros(n, dtype=np.float32),
        "weight": np.ones(n, dtype=np.float32),
    }
    with pytest.raises(OnboardError, match="train row 5 has task id 1"):
        onboard(model, "fresh", arrays, None, cfg, log=None)


def _onboard_argv(src: str, data, out) -> list[str]:
    argv = ["train", "--add-task", "fresh", "--from", src, "--data", str(data), "--out", str(out)]
    return argv + [x for f in FAST for x in ("--onboard-set", f)]


def test_cli_onboards_from_a_checkpoint_dir(trained, tmp_path, capsys):
    ckpt, data = trained
    assert cli_main(_onboard_argv(str(ckpt), data, tmp_path / "cli-out")) == 0
    out = capsys.readouterr().out
    assert '"task_id": 3' in out and f"CHECKPOINT={tmp_path / 'cli-out'}" in out
    assert TaskRegistry.from_dict(read_config(tmp_path / "cli-out")["tasks"]).names[-1] == "fresh"


def test_onboard_from_mlflow_then_export_like_any_model(trained, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from pipeline.export import ExportConfig, export_checkpoint

    ckpt, data = trained
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment("onboard", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.log_artifacts(run_id, str(ckpt), "model")
    assert cli_main(_onboard_argv(f"runs:/{run_id}/model", data, tmp_path / "grown")) == 0
    result = export_checkpoint(
        tmp_path / "grown", tmp_path / "export", ExportConfig(tasks=["fresh"])
    )
    te = result.tasks["fresh"]
    assert te.meta["task_id"] == 3
    assert all(rep["pass"] for rep in te.parity["variants"].values())


def test_cli_errors_name_what_is_wrong(trained, tmp_path, capsys):
    ckpt, data = trained
    assert cli_main(["train", "--add-task", "fresh", "--from", str(ckpt)]) == 2
    assert "--add-task needs --data" in capsys.readouterr().err
    assert cli_main(_onboard_argv(str(tmp_path / "nowhere"), data, tmp_path / "o")) == 2
    assert "nowhere" in capsys.readouterr().err
    argv = _onboard_argv(str(ckpt), data, tmp_path / "o2")
    argv[argv.index("fresh")] = "exact"  # already a task of the model
    assert cli_main(argv) == 2
    assert "task 'exact' already exists" in capsys.readouterr().err
    assert cli_main(["train"]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert cli_main(_onboard_argv(str(tmp_path / "nowhere"), data, tmp_path / "o")) == 2
    assert f"--from '{tmp_path / 'nowhere'}': no such directory" in capsys.readouterr().err
    argv = _onboard_argv(str(ckpt), data, tmp_path / "o3")
    argv[argv.index("fresh")] = ""
    assert cli_main(argv) == 2
    assert "task name" in capsys.readouterr().err.lower()
    argv = _onboard_argv(str(ckpt), data, tmp_path / "o4")
    assert cli_main([*argv, "--onboard-max-rows", "-5"]) == 2
    assert "max_rows (--onboard-max-rows) must be an integer >= 1, got -5" in (
        capsys.readouterr().err
    )


def test_a_bad_override_fails_before_anything_is_written(trained, tmp_path):
    ckpt, data = trained
    bad = _rows(6, 3)
    bad.loc[1, "query"] = " "  # a row that would be quarantined
    bad.to_parquet(data / "train" / "task=fresh" / "part-1.parquet", index=False)
    with pytest.raises(ValueError, match="optim.lr"):
        add_task(ckpt, "fresh", data, tmp_path / "out", overrides=["optim.lr=-1"], log=None)
    assert not (tmp_path / "out.quarantine").exists() and not (tmp_path / "out").exists()
