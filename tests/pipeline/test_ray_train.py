"""Training on real Ray Train (local cluster, gloo DDP), with real MLflow on sqlite.

Data: small keyword tasks in the contract layout, learnable by the tiny random encoder in
tens of steps (features.synth's tasks need a pretrained encoder to be learnt that fast).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.checkpoint import load_checkpoint, read_config
from pipeline.config import build_config
from pipeline.ray_train import TRAIN_STATE_FILE, run_training

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORDS = [
    "red",
    "blue",
    "green",
    "shoe",
    "boot",
    "hat",
    "lamp",
    "desk",
    "chair",
    "sofa",
    "phone",
    "cable",
    "river",
    "hill",
    "apple",
    "pear",
]
QUERY_WORDS = ["cheap", "buy", "best", "new", "sale", "online", "near", "deals"]
# Each task has its own idea of relevance: the ad mentions one of the task's words.
KEYWORD_TASKS = {
    "colours": ("red", "blue"),
    "furniture": ("lamp", "desk"),
    "fruit": ("apple", "pear"),
}


def write_keyword_tasks(root: Path, rows_per_task: int, seed: int) -> Path:
    """ROOT/task=<name>/part-0.parquet with query, ad_title, ad_description, label."""
    rng = np.random.default_rng(seed)
    for task, pos in KEYWORD_TASKS.items():
        neg = [w for w in WORDS if w not in pos]
        labels = rng.random(rows_per_task) < 0.5
        titles = [
            " ".join([*rng.choice(pos, 1), *rng.choice(WORDS, 2)])
            if y
            else " ".join(rng.choice(neg, 3))
            for y in labels
        ]
        table = pa.table(
            {
                "query": [" ".join(rng.choice(QUERY_WORDS, 2)) for _ in labels],
                "ad_title": titles,
                "ad_description": [
                    None if i % 3 else "free delivery" for i in range(rows_per_task)
                ],
                "label": pa.array(labels.astype(np.int8), pa.int8()),
            }
        )
        (root / f"task={task}").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / f"task={task}" / "part-0.parquet")
    return root


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyword-data")
    return write_keyword_tasks(root / "train", 160, 0), write_keyword_tasks(root / "dev", 60, 1)


def tiny_cfg(tmp_path, enc, data, *overrides):
    train, dev = data
    return build_config(
        {"data": {"train_root": str(train), "dev_root": str(dev), "max_length": 32}},
        [
            f"workdir={tmp_path / 'work'}",
            f"model.base_model={enc}",
            "model.head_dropout=0.0",
            "model.adapter.r=4",
            "model.adapter.n_up=2",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
            "optim.batch_size=16",
            "optim.max_steps=40",
            "eval.every_steps=20",
            "checkpoint.every_steps=10",
            "tracking.log_every_steps=5",
            "tracking.experiment=test-train",
            "scaling.resources_per_worker={CPU: 1}",
            *overrides,
        ],
    )


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _ray_train_workers() -> list:
    """This test session's Ray Train worker processes (descendants of this process only)."""
    import psutil

    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def registered_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train's controller has registered (its snapshot in the run directory).

    A checkpoint directory appears on upload; the controller registers it at its next poll of
    the workers (every ~2 s), and only registered checkpoints are restored after a failure.
    """
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return [
            c["checkpoint_dir_name"] for c in json.loads(snap.read_text())["checkpoint_results"]
        ]
    except (OSError, ValueError, KeyError):
        return []


# What a killed attempt can leave behind: a checkpoint uploaded but never registered.
STALE_UPLOAD = "checkpoint-0000015-5ta1e0"


def plant_stale_upload(run_dir: Path) -> None:
    (run_dir / STALE_UPLOAD).mkdir()
    (run_dir / STALE_UPLOAD / "model.safetensors").write_bytes(b"partial")


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list[int]) -> threading.Thread:
    def watch():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if registered_checkpoints(run_dir):
                workers = _ray_train_workers()
                if workers:
                    workers[-1].send_signal(signal.SIGKILL)
                    killed.append(workers[-1].pid)
                    plant_stale_upload(run_dir)
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_two_workers_survive_a_killed_worker_learn_and_track(
    ray_local, tmp_path, tiny_encoder_dir, keyword_data, mlflow_uri
):
    """2 workers (gloo DDP): a worker SIGKILLed after the first checkpoint, Ray Train restarts
    the group from that checkpoint, the run completes, learns every task, and MLflow holds it."""
    from mlflow.tracking import MlflowClient

    cfg = tiny_cfg(
        tmp_path,
        tiny_encoder_dir,
        keyword_data,
        "scaling.num_workers=2",
        "optim.max_steps=80",
        "run_name=two-workers",
        "checkpoint.max_failures=1",
    )
    killed: list[int] = []
    watcher = _kill_a_worker_after_first_checkpoint(
        Path(cfg.storage_path()) / "two-workers", killed
    )
    res = run_training(cfg, config_text="# the config file\n", config_name="tiny.yaml")
    watcher.join(timeout=5)

    # Fault tolerance: restarted from a checkpoint (not from step 0), and finished.
    assert killed, "no training worker was found to kill"
    assert res.step == 80 and res.run_name == "two-workers"
    resumed = int(res.metrics["resumed_from_step"])
    assert 10 <= resumed < 80 and resumed % 10 == 0, res.metrics

    # Learning: every task clearly above chance on dev.
    for task in KEYWORD_TASKS:
        assert res.metrics[f"best/auc/{task}"] > 0.7, res.metrics
    assert res.best_macro_auc == pytest.approx(res.metrics["best/macro_auc"])

    # The final checkpoint: the foundation format (best weights) plus the resumable state.
    ckpt = Path(res.local_checkpoint_dir)
    assert ckpt.is_dir() and ckpt.parent == Path(cfg.storage_path()) / "two-workers"
    assert res.checkpoint_path == str(ckpt)
    assert (ckpt / TRAIN_STATE_FILE).is_file()
    meta = read_config(ckpt)
    assert meta["extra"]["weights"] == "best" and meta["extra"]["best_step"] == res.best_step
    assert meta["extra"]["mlflow_run_id"] == res.mlflow_run_id
    model, _ = load_checkpoint(ckpt)
    assert model.tasks.names == sorted(KEYWORD_TASKS)
    # Only the checkpoint.keep (2) checkpoints Ray kept are left: the killed attempt's
    # unregistered upload is removed with the rest.
    left = sorted(p.name for p in ckpt.parent.iterdir() if p.name.startswith("checkpoint-"))
    assert len(left) == 2 and ckpt.name in left and STALE_UPLOAD not in left, left
    assert left == sorted(registered_checkpoints(ckpt.parent)), left

    # MLflow, checked through the client: one run, continued across the restart.
    client = MlflowClient(mlflow_uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["optim.lr"] == "0.003" and p["scaling.num_workers"] == "2"
    assert p["model.adapter.r"] == "4" and p["data.num_tasks"] == "3"
    t = run.data.tags
    for key in ("system.torch", "system.transformers", "system.ray", "system.device"):
        assert t[key]
    assert t["system.world_size"] == "2" and t["adrel.run_name"] == "two-workers"
    assert t["adrel.checkpoint_path"] == res.checkpoint_path
    assert t["adrel.resumed_from_step"] == str(resumed)
    steps = [s for s, _ in _history(client, res.mlflow_run_id, "train/loss")]
    assert set(steps) == set(range(5, 81, 5))
    assert all(steps.count(s) == 1 for s in steps if s <= resumed)  # trained once up to there
    for task in KEYWORD_TASKS:
        assert {s for s, _ in _history(client, res.mlflow_run_id, f"dev/auc/{task}")} == {
            20,
            40,
            60,
            80,
        }
    macro = _history(client, res.mlflow_run_id, "dev/macro_auc")
    assert max(v for _, v in macro) == pytest.approx(res.best_macro_auc)
    arts = {a.path for a in client.list_artifacts(res.mlflow_run_id, "checkpoint")}
    assert {
        "checkpoint/config.json",
        "checkpoint/adapter.safetensors",
        "checkpoint/tokenizer.json",
    } <= arts
    configs = {a.path for a in client.list_artifacts(res.mlflow_run_id, "config")}
    assert configs == {"config/tiny.yaml", "config/resolved.yaml"}


def test_missing_task_data_is_reported(tmp_path, tiny_encoder_dir, keyword_data):
    from pipeline.ray_train import DataError, preflight

    cfg = tiny_cfg(tmp_path, tiny_encoder_dir, keyword_data, "data.tasks=[colours, nope, gone]")
    with pytest.raises(DataError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert "task 'nope' has no data under data.train_root" in msg
    assert "task 'gone' has no data under data.dev_root" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_cfg(tmp_path, tiny_encoder_dir, (empty, keyword_data[1]))
    with pytest.raises(DataError, match="no task partitions under data.train_root"):
        preflight(cfg)


# Last in the module: it shuts the shared local cluster down for its own two-node one.
def test_two_node_cluster(tmp_path, tiny_encoder_dir, keyword_data, mlflow_uri):
    """The multi-node path: one worker on each node of a two-node local cluster, checkpoints
    to storage given as a file:// URI."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from jobs.runtime import set_env_defaults

    ray.shutdown()  # the shared local cluster, if any: this test needs its own
    set_env_defaults()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"},
    )
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = tiny_cfg(
            tmp_path,
            tiny_encoder_dir,
            keyword_data,
            "scaling.num_workers=2",
            "run_name=two-nodes",
            "optim.max_steps=20",
            "optim.grad_accum=2",  # DDP's no_sync on the first micro-batch of each step
            "eval.every_steps=20",
            "checkpoint.every_steps=10",
            # Storage as a pyarrow filesystem URI (what a shared store looks like to nodes).
            f"checkpoint.storage_path=file://{tmp_path / 'shared-storage'}",
        )
        res = run_training(cfg)
        assert res.step == 20
        assert res.checkpoint_path.startswith(f"file://{tmp_path / 'shared-storage'}/two-nodes/")
        ckpt = Path(res.local_checkpoint_dir)
        assert ckpt.parent == tmp_path / "shared-storage" / "two-nodes"
        assert (ckpt / "config.json").is_file() and (ckpt / TRAIN_STATE_FILE).is_file()
        tags = MlflowClient(mlflow_uri).get_run(res.mlflow_run_id).data.tags
        assert tags["system.num_nodes"] == "2" and tags["system.world_size"] == "2"
    finally:
        ray.shutdown()
        cluster.shutdown()
