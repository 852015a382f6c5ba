"""Ray Train around the training loop: ingest, TorchTrainer, checkpoints, MLflow on rank 0.

    run_training(cfg)   driver: resolve tasks, ingest train/dev through Ray Data
                        (pipeline.ingest), start `TorchTrainer`, return a `TrainResult`
    train_worker(wc)    one Ray Train worker (DDP rank): build the model, materialise its
                        dataset shard, resume from `ray.train.get_checkpoint()`, run TrainLoop
    RayReporter         the loop's callback: `ray.train.report` on every rank at the same
                        steps (rank 0 attaches the checkpoint), MLflow on rank 0 only

A checkpoint is the foundation's checkpoint directory (models.checkpoint.save_checkpoint)
plus `train_state.pt` (optimizer, scheduler, per-rank sampler and RNG state, step, best
metric and best weights). Periodic checkpoints hold the current weights; the last one holds
the best weights (selected on dev macro AUC). Ray Train restores the latest checkpoint both
when it restarts failed workers (FailureConfig) and when a job is started again with the same
run name and storage path, so a killed run continues where its last checkpoint left it.

Nothing here starts Ray: the job does (jobs.runtime.ensure_ray).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from features.tasks import TaskRegistry
from pipeline.config import TrainConfig
from pipeline.train_loop import Callback, LoopResult, TrainLoop, set_seed

TINY_ENCODER = "tiny-random-bert"  # base_model spec: a tiny random BERT made under the workdir
TRAIN_STATE_FILE = "train_state.pt"


class DataError(ValueError):
    """The data do not fit the config (missing roots or tasks, no clean rows for a task)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("training data problem(s):\n  - " + "\n  - ".join(self.errors))


class TrainingFailed(RuntimeError):
    """Ray Train gave up (worker errors beyond checkpoint.max_failures)."""


@dataclass
class TrainResult:
    """What a finished run produced; the retraining job consumes it.

    checkpoint_path: the final checkpoint (best weights) in storage, a path or URI.
    local_checkpoint_dir: the same directory on this machine (None for remote storage).
    """

    run_name: str
    checkpoint_path: str
    local_checkpoint_dir: str | None
    mlflow_run_id: str | None
    tracking_uri: str | None
    metrics: dict = field(default_factory=dict)
    step: int = 0
    best_step: int = 0
    best_macro_auc: float = float("nan")
    storage_path: str = ""
    resumed_from_step: int | None = None  # the checkpoint step the last attempt started from

    def summary(self) -> str:
        per_task = {
            k.removeprefix("best/auc/"): v
            for k, v in self.metrics.items()
            if k.startswith("best/auc/")
        }
        resumed = f", resumed from step {self.resumed_from_step}" if self.resumed_from_step else ""
        lines = [
            f"run: {self.run_name} ({self.step} steps, best macro AUC {self.best_macro_auc:.4f} "
            f"at step {self.best_step}{resumed})",
            "per-task dev AUC: " + ", ".join(f"{t} {v:.4f}" for t, v in sorted(per_task.items())),
            f"mlflow run id: {self.mlflow_run_id} ({self.tracking_uri})",
            f"checkpoint: {self.checkpoint_path}",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Driver


def default_run_name() -> str:
    return time.strftime("train-%Y%m%d-%H%M%S")


def resolve_base_model(spec: str, workdir: str | Path) -> str:
    """A loadable encoder path for `spec`; TINY_ENCODER is created under the workdir."""
    from models.encoder import resolve_encoder

    if spec == TINY_ENCODER:
        from models.tiny import make_tiny_encoder

        return str(make_tiny_encoder(Path(workdir).resolve() / "encoders" / TINY_ENCODER))
    return resolve_encoder(spec)


def prepare_synthetic(cfg: TrainConfig) -> None:
    """Generate synthetic train/dev data into roots that hold no task partitions yet."""
    syn = cfg.data.synthetic
    if syn is None:
        return
    from features.schema import list_tasks
    from features.synth import generate

    tasks = None if cfg.data.tasks == "all" else cfg.data.tasks
    for root, rows, seed in (
        (cfg.data.train_root, syn.rows_per_task, syn.seed),
        (cfg.data.dev_root, syn.dev_rows_per_task, syn.seed + 1),
    ):
        if not Path(root).is_dir() or not list_tasks(root):
            generate(root, rows, seed, tasks=tasks)


def resolve_tasks(cfg: TrainConfig) -> TaskRegistry:
    """The task registry of the run; every task needs a partition in train and dev."""
    from features.schema import TASK_DIR_PREFIX, list_tasks

    errors, found = [], {}
    for split, root in (("train", cfg.data.train_root), ("dev", cfg.data.dev_root)):
        if not Path(root).is_dir():
            errors.append(f"data.{split}_root: no directory at {root!r}")
            found[split] = []
        else:
            found[split] = list_tasks(root)
    if errors:
        raise DataError(errors)
    names = found["train"] if cfg.data.tasks == "all" else list(cfg.data.tasks)
    if not names:
        errors.append(
            f"no task partitions under data.train_root {cfg.data.train_root!r} "
            f"(expected {TASK_DIR_PREFIX}<name>/*.parquet)"
        )
    for split, root in (("train", cfg.data.train_root), ("dev", cfg.data.dev_root)):
        for t in names:
            if t not in found[split]:
                errors.append(
                    f"task {t!r} has no data under data.{split}_root ({root}/{TASK_DIR_PREFIX}{t})"
                )
    if errors:
        raise DataError(errors)
    return TaskRegistry(names)


def ingest_split(
    cfg: TrainConfig, split: str, registry: TaskRegistry, tok_dir: str, quarantine: Path
):
    """Validated, tokenised rows of one split, materialised in the object store (so workers
    that hold every CPU still get their shards), and the clean rows per task."""
    from models.adapters import uses_task_prefix
    from pipeline.ingest import ingest

    root = cfg.data.train_root if split == "train" else cfg.data.dev_root
    res = ingest(
        root,
        registry,
        tok_dir,
        cfg.data.max_length,
        cfg.data.validation_config(),
        quarantine / split,
        task_prefix=uses_task_prefix(cfg.model.adapter.variant),
    )
    counts = [
        res.report.per_task[t].clean if t in res.report.per_task else 0 for t in registry.names
    ]
    empty = [t for t, n in zip(registry.names, counts) if n == 0]
    if empty:
        raise DataError(
            [
                f"task {t!r} has no clean rows in data.{split}_root ({root}); see {quarantine / split}"
                for t in empty
            ]
        )
    return res.dataset.materialize(), counts, res.report


def preflight(cfg: TrainConfig) -> tuple[TrainConfig, TaskRegistry]:
    """Checks that need no Ray: the run's config with absolute paths and a run name (workers
    run in other directories and on other nodes), synthetic data made, tasks resolved."""
    cfg = cfg.model_copy(deep=True)
    cfg.run_name = cfg.run_name or default_run_name()
    cfg.workdir = str(Path(cfg.workdir).resolve())
    cfg.data.train_root = str(Path(cfg.data.train_root).resolve())
    cfg.data.dev_root = str(Path(cfg.data.dev_root).resolve())
    prepare_synthetic(cfg)
    return cfg, resolve_tasks(cfg)


def run_training(
    cfg: TrainConfig, config_text: str | None = None, config_name: str = "train.yaml", log=print
) -> TrainResult:
    """Ingest, train on Ray Train, return the result (needs a running Ray: jobs start it)."""
    import ray
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from models.encoder import tokenizer_dir
    from pipeline import tracking

    cfg, registry = preflight(cfg)
    if not ray.is_initialized():
        raise RuntimeError("Ray is not running: start it first (jobs.runtime.ensure_ray)")
    workdir, run_name = Path(cfg.workdir), cfg.run_name
    base_model = resolve_base_model(cfg.model.base_model, workdir)
    tok_dir = str(tokenizer_dir(base_model))
    quarantine = Path(cfg.data.quarantine_dir or workdir / "quarantine" / run_name).resolve()
    train_ds, train_counts, train_report = ingest_split(cfg, "train", registry, tok_dir, quarantine)
    dev_ds, dev_counts, _ = ingest_split(cfg, "dev", registry, tok_dir, quarantine)
    log(
        f"run {run_name}: {len(registry)} task(s), {sum(train_counts)} train / {sum(dev_counts)} dev "
        f"rows ({train_report.rows_quarantined} train rows quarantined)"
    )

    tracking_uri = (
        tracking.resolve_tracking_uri(workdir, cfg.tracking.uri) if cfg.tracking.enabled else None
    )
    storage = cfg.storage_path()
    sc = cfg.scaling
    cpus = (sc.resources_per_worker or {}).get("CPU", 1)
    worker_cfg = {
        "cfg": cfg.to_dict(),
        "tasks": registry.to_dict(),
        "task_counts": train_counts,
        "base_model": base_model,
        "tokenizer_dir": tok_dir,
        "torch_threads": sc.torch_threads or max(1, int(cpus)),
        "tracking_uri": tracking_uri,
        "artifact_location": tracking.artifact_location(tracking_uri, workdir)
        if tracking_uri
        else None,
        "config_text": config_text,
        "config_name": config_name,
        "storage_path": storage,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_cfg,
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=sc.resources_per_worker,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            # Ray Train's own INFO lines repeat every report's metrics; ours say what matters.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": train_ds, "dev": dev_ds},
        # Each worker trains on its shard of train and evaluates its slice of the whole dev.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        raise TrainingFailed(f"training run {run_name!r} failed: {_failure_summary(e)}") from e
    pruned = prune_unregistered_checkpoints(result, log)
    if pruned:
        log(f"run {run_name}: removed {len(pruned)} checkpoint(s) left by a failed attempt")
    return _train_result(result, run_name, storage, tracking_uri)


def prune_unregistered_checkpoints(result, log=print) -> list[str]:
    """Remove checkpoint directories of this run that Ray Train never registered.

    A worker uploads its checkpoint directory before the controller registers it; when the
    group fails in between (a killed worker), the upload stays behind, unknown to Ray Train's
    `num_to_keep` and never restored from. After a successful run only the checkpoints Ray kept
    are left. Cleanup is best effort: a storage error is reported, never raised.
    """
    import pyarrow.fs as pafs

    fs, run_dir = result.filesystem, result.path
    kept = {Path(c.path).name for c, _ in result.best_checkpoints or []}
    if result.checkpoint is not None:
        kept.add(Path(result.checkpoint.path).name)
    removed = []
    try:
        entries = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
        for e in entries:
            stale = e.base_name.startswith("checkpoint-") and e.base_name not in kept
            if stale and e.type == pafs.FileType.Directory:
                fs.delete_dir(e.path)
                removed.append(e.base_name)
    except (OSError, ValueError) as err:
        log(f"warning: could not clean up stale checkpoints under {run_dir}: {err}")
    return sorted(removed)


def _train_result(result, run_name: str, storage: str, tracking_uri: str | None) -> TrainResult:
    if result.checkpoint is None:
        raise TrainingFailed(f"training run {run_name!r} finished without a checkpoint")
    m = dict(result.metrics or {})
    name = Path(result.checkpoint.path).name
    remote = "://" in storage and not storage.startswith("file://")
    local_root = storage.removeprefix("file://")
    return TrainResult(
        run_name=run_name,
        checkpoint_path=f"{storage.rstrip('/')}/{run_name}/{name}",
        local_checkpoint_dir=None if remote else str(Path(local_root) / run_name / name),
        mlflow_run_id=m.get("mlflow_run_id") or None,
        tracking_uri=tracking_uri,
        metrics=m,
        step=int(m.get("step", 0)),
        best_step=int(m.get("best_step", 0)),
        best_macro_auc=float(m.get("best/macro_auc", float("nan"))),
        storage_path=storage,
        resumed_from_step=int(m["resumed_from_step"])
        if m.get("resumed_from_step", -1) >= 0
        else None,
    )


def _failure_summary(e: BaseException) -> str:
    failures = getattr(e, "worker_failures", None)
    if failures:
        parts = []
        for rank, err in sorted(failures.items()):
            cause = getattr(err, "cause", None) or err
            first = str(cause).strip().splitlines()
            parts.append(f"rank {rank}: {type(cause).__name__}: {first[-1] if first else ''}")
        return "; ".join(parts)
    cause = getattr(e, "controller_failure", None) or e
    return f"{type(cause).__name__}: {cause}"


# ---------------------------------------------------------------------------------------------
# Worker


def train_worker(wc: dict) -> None:
    """The per-worker function Ray Train runs (one DDP rank)."""
    import ray.train
    import ray.train.torch

    from models.adapters import adapter_class
    from models.checkpoint import build_model
    from pipeline.ingest import to_numpy

    cfg = TrainConfig.model_validate(wc["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(wc["torch_threads"])
    set_seed(cfg.seed)  # identical initial weights on every rank
    registry = TaskRegistry.from_dict(wc["tasks"])
    adapter = cfg.model.adapter.to_adapter_config(len(registry))
    model = build_model(
        wc["base_model"], adapter, registry, cfg.model.pooling, cfg.model.head_dropout
    )
    # Full fine-tuning leaves the encoder's unused pooler trainable: DDP must tolerate it.
    unused = not adapter_class(adapter.variant).freezes_base
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": unused}
    )
    train = to_numpy(ray.train.get_dataset_shard("train"))
    dev = to_numpy(ray.train.get_dataset_shard("dev"))
    reporter = RayReporter(wc, rank, world)
    loop = TrainLoop(
        model,
        train,
        dev,
        cfg,
        callbacks=[reporter],
        task_counts=np.asarray(wc["task_counts"]),
        log=_worker_log if rank == 0 else None,
    )
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
        loop.load_state_dict(state)
        reporter.resume_from(state)
        if rank == 0:
            _worker_log(f"resuming run {cfg.run_name} from step {loop.step}")
    loop.run()


def _worker_log(msg: str) -> None:
    # Ray Train sends worker logging to the driver's console; print() would be echoed twice.
    logging.getLogger("adrel.train").info(msg)


def checkpoint_staging_dir(storage_path: str, run_name: str) -> Path:
    """Where rank 0 writes a checkpoint before Ray Train persists it: one local folder per run,
    emptied before each checkpoint and removed after it. A worker killed in between (inside
    ray.train.report, say) leaves this one folder, which the resumed run clears, instead of a
    new temporary folder a kill."""
    key = hashlib.sha256(f"{storage_path}\0{run_name}".encode()).hexdigest()[:12]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"adrel-ckpt-{uid}-{key}"


class RayReporter(Callback):
    """Reports to Ray Train on every rank at the same steps; MLflow and files on rank 0."""

    def __init__(self, wc: dict, rank: int, world_size: int):
        self.wc = wc
        self.cfg = TrainConfig.model_validate(wc["cfg"])
        self.rank, self.world_size = rank, world_size
        self.client = None
        self.run_id: str | None = None
        self.resumed_step: int | None = None

    def resume_from(self, state: dict) -> None:
        self.run_id = state.get("mlflow_run_id") or None
        self.resumed_step = int(state["step"])

    # ----- MLflow (rank 0) -----

    def on_train_start(self, loop: TrainLoop) -> None:
        nodes = _gather_nodes(self.world_size)  # a collective: every rank takes part
        if self.rank != 0 or not self.wc["tracking_uri"]:
            return
        from pipeline import tracking

        self.client = c = tracking.client(self.wc["tracking_uri"])
        exp = tracking.experiment_id(c, self.cfg.tracking.experiment, self.wc["artifact_location"])
        resuming = self.run_id is not None
        self.run_id = tracking.start_run(c, exp, self.cfg.run_name, self.run_id)
        tags = tracking.system_info(loop.device, self.world_size)
        tags["system.nodes"] = ",".join(nodes)
        tags["system.num_nodes"] = str(len(set(nodes)))
        tags["adrel.tasks"] = ",".join(loop.module.tasks.names)
        tags["adrel.storage_path"] = self.wc["storage_path"]
        if resuming:
            tags["adrel.resumed_from_step"] = str(self.resumed_step)
        else:
            params = tracking.flatten(self.cfg.to_dict())
            params.update(
                {
                    "data.num_tasks": str(len(loop.module.tasks)),
                    "train.total_steps": str(loop.total_steps),
                }
            )
            params["model.trainable_parameters"] = str(loop.module.num_trainable())
            tracking.log_params(c, self.run_id, params)
            if self.wc["config_text"]:
                c.log_text(self.run_id, self.wc["config_text"], f"config/{self.wc['config_name']}")
            c.log_text(
                self.run_id,
                yaml.safe_dump(self.cfg.to_dict(), sort_keys=False),
                "config/resolved.yaml",
            )
        tracking.set_tags(c, self.run_id, tags)

    def on_log(self, loop: TrainLoop, step: int, logs: dict[str, float]) -> None:
        if self.client is not None:
            from pipeline import tracking

            tracking.log_metrics(self.client, self.run_id, logs, step)

    def on_eval(
        self, loop: TrainLoop, step: int, metrics: dict[str, float], improved: bool
    ) -> None:
        if self.client is not None:
            from pipeline import tracking

            tracking.log_metrics(self.client, self.run_id, metrics, step)

    # ----- Ray Train reports and checkpoints (every rank) -----

    def on_checkpoint(self, loop: TrainLoop, step: int) -> None:
        self._report(loop, final=False)

    def on_train_end(self, loop: TrainLoop, result: LoopResult) -> None:
        from models.checkpoint import load_trainable

        if loop.best_state is not None:
            load_trainable(loop.module, loop.best_state, source="best state")
        name, metrics = self._report(loop, final=True, result=result)
        if self.client is None:
            return
        from pipeline import tracking

        tracking.log_metrics(self.client, self.run_id, self._best_metrics(loop), loop.step)
        tracking.set_tags(
            self.client,
            self.run_id,
            {
                "adrel.checkpoint_path": f"{self.wc['storage_path'].rstrip('/')}/{self.cfg.run_name}/{name}",
                "adrel.best_step": str(loop.best_step),
                "adrel.stopped_early": str(result.stopped_early),
            },
        )
        tracking.end_run(self.client, self.run_id)

    def _report(self, loop: TrainLoop, final: bool, result: LoopResult | None = None):
        """Every rank: the same report; rank 0 attaches the checkpoint directory."""
        import ray.train

        state = loop.state_dict()  # a collective: every rank gathers sampler/RNG states
        metrics = {
            "step": loop.step,
            "total_steps": loop.total_steps,
            "final": final,
            "mlflow_run_id": self.run_id or "",
            "resumed_from_step": -1 if self.resumed_step is None else self.resumed_step,
            **{k: v for k, v in loop.last_metrics.items()},
        }
        if final:
            metrics.update(self._best_metrics(loop))
            metrics["best_step"] = loop.best_step
            metrics["stopped_early"] = bool(result and result.stopped_early)
            # Rank 0's step timing (benchmarks read it): data vs forward/backward vs optimizer.
            metrics.update({f"timing/{k}": v for k, v in loop.timing.items()})
        name = f"checkpoint-{loop.step:07d}{'-final' if final else ''}-{secrets.token_hex(3)}"
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return name, metrics
        staging = checkpoint_staging_dir(self.wc["storage_path"], self.cfg.run_name)
        shutil.rmtree(staging, ignore_errors=True)  # what a killed attempt left
        try:
            d = staging / name
            self._write_checkpoint(loop, state, d, final)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(d)),
                checkpoint_dir_name=name,
            )
            if final and self.client is not None:
                self.client.log_artifacts(self.run_id, str(d), "checkpoint")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return name, metrics

    def _write_checkpoint(self, loop: TrainLoop, state: dict, d: Path, final: bool) -> None:
        from models.checkpoint import save_checkpoint

        extra = {
            "run_name": self.cfg.run_name,
            "step": loop.step,
            "final": final,
            "weights": "best" if final else "current",
            "best_step": loop.best_step,
            "best_metrics": self._best_metrics(loop),
            "mlflow_run_id": self.run_id,
            "train_config": self.cfg.to_dict(),
        }
        save_checkpoint(
            loop.module,
            d,
            max_length=self.cfg.data.max_length,
            tokenizer_from=self.wc["tokenizer_dir"],
            extra=extra,
        )
        state = {
            **state,
            "mlflow_run_id": self.run_id,
            "run_name": self.cfg.run_name,
            "final": final,
        }
        torch.save(state, d / TRAIN_STATE_FILE)

    @staticmethod
    def _best_metrics(loop: TrainLoop) -> dict[str, float]:
        """The dev metrics of the best evaluation, as best/<name>."""
        best = next((h for h in loop.history if h["step"] == loop.best_step), None)
        if best is None:
            return {}
        skip = {"step", "dev/best_macro_auc"}
        return {"best/" + k.removeprefix("dev/"): v for k, v in best.items() if k not in skip}


def _gather_nodes(world_size: int) -> list[str]:
    """The Ray node id of every rank, in rank order."""
    import ray
    import torch.distributed as dist

    me = ray.get_runtime_context().get_node_id()
    if world_size == 1 or not dist.is_initialized():
        return [me]
    nodes: list = [None] * world_size
    dist.all_gather_object(nodes, me)
    return nodes
