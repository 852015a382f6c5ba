"""Onboard a new task onto a trained multi-task model without retraining the others.

The model grows by one task: the task registry keeps every old id and the new task gets the
next one; every per-task tensor (MTL-LoRA's Λ_t and w_t, a task gate, per-task LoRAs, the
heads) gains one row, initialised as a fresh layer would. Only that row trains, by the one
training loop (pipeline.train_loop) on the new task's rows alone; shared parts (A, the B_i,
the encoder) stay frozen unless `train_shared` is set. The old rows are restored bit for bit
after training (AdamW's decoupled weight decay touches every row of a tensor it steps), so old
tasks' logits are identical to the original model's. With `train_shared` old tasks change:
that is a cheaper retrain, not an onboarding.

    add_task(ckpt_dir, "newtask", data_dir, out_dir)       # library entry point
    adrel train --add-task NAME --from URI --data DIR      # the CLI (jobs/train.py)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from features.tasks import TaskRegistry, check_task_name
from models.classifier import RelevanceClassifier

# Optimisation defaults for the handful of per-task parameters (higher lr than a full run:
# few parameters, one task, nothing shared to disturb). Callers override any of them.
DEFAULT_OVERRIDES = {
    "optim": {"lr": 1e-3, "epochs": 2.0, "warmup_ratio": 0.05, "batch_size": 32},
    "eval": {"every_steps": 50},
    "tracking": {"enabled": False},
}


class OnboardError(ValueError):
    """The model or data cannot be onboarded as asked; the message names the reason."""


@dataclass
class OnboardReport:
    """What onboarding did: the new task's id, what trained, how long, dev metrics."""

    task: str
    task_id: int
    tasks: list[str]
    train_rows: int
    dev_rows: int
    trainable_params: int
    train_shared: bool
    seconds: float
    steps: int
    best_step: int
    dev_auc: float
    quarantined: int = 0
    out_dir: str | None = None
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def task_axis_keys(model: RelevanceClassifier) -> list[str]:
    """Names (as in `model.named_parameters()`) of the tensors holding one row per task."""
    keys = ["head_weight", "head_bias"]
    for name, layer in model.adapter_layers().items():
        keys += [f"encoder.{name}.{p}" for p in type(layer).task_params]
    return keys


def extend_model(model: RelevanceClassifier, name: str, seed: int = 0) -> RelevanceClassifier:
    """A copy of `model` with task `name` appended (id = old task count).

    Every old tensor is copied exactly; the new task's rows get a fresh layer's init (seeded).
    The original model is not modified.
    """
    check_task_name(name)
    if name in model.tasks:
        raise OnboardError(
            f"task {name!r} already exists in the model (id {model.tasks.id(name)}); "
            f"tasks: {model.tasks.names}"
        )
    T = model.num_tasks
    tasks = TaskRegistry([*model.tasks.names, name])
    cfg = replace(model.adapter_cfg, num_tasks=T + 1)
    encoder = _plain_copy(model.encoder)
    torch.manual_seed(seed)
    new = RelevanceClassifier(
        encoder,
        cfg,
        tasks,
        model.pooling,
        float(getattr(model.head_dropout, "p", 0.0)),
        base_model=model.base_model,
    )
    old = dict(model.named_parameters())
    axis = set(task_axis_keys(model))
    with torch.no_grad():
        for key, p in new.named_parameters():
            if key in axis:
                p[:T].copy_(old[key])  # rows 0..T-1: the old tasks, exactly
            elif key in old:
                p.copy_(old[key])
    new.train(model.training)
    return new


def _plain_copy(encoder: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the encoder with every adapter layer replaced by its base linear."""
    from models.inject import adapter_layers

    enc = copy.deepcopy(encoder)
    for name, layer in adapter_layers(enc).items():
        parent_name, _, child = name.rpartition(".")
        parent = enc.get_submodule(parent_name) if parent_name else enc
        setattr(parent, child, layer.base)
    return enc


def onboard(
    model: RelevanceClassifier,
    name: str,
    train: dict[str, np.ndarray],
    dev: dict[str, np.ndarray] | None,
    cfg,
    train_shared: bool = False,
    log: Callable[[str], None] | None = print,
) -> tuple[RelevanceClassifier, OnboardReport]:
    """Extend `model` by task `name` and train its rows on `train` (arrays of the training
    loop, task_id == the new id). `cfg` is a pipeline.config.TrainConfig (optim, eval, seed).

    Returns the extended model (old tasks bit-identical unless `train_shared`) and a report.
    """
    from pipeline.train_loop import TrainLoop

    new = extend_model(model, name, seed=cfg.seed)
    t = new.tasks.id(name)
    for split, arrays in (("train", train), ("dev", dev)):
        if arrays is not None:
            _check_only_task(arrays, t, name, split)
    axis = task_axis_keys(new)
    snapshot = {k: v.detach().clone() for k, v in new.named_parameters()}
    flags = {k: p.requires_grad for k, p in new.named_parameters()}
    params = dict(new.named_parameters())
    for key, p in params.items():
        p.requires_grad_(key in axis or (train_shared and flags[key]))
    trainable = sum(
        params[k][t].numel() if k in axis else p.numel()
        for k, p in params.items()
        if p.requires_grad
    )
    t0 = time.perf_counter()
    try:
        loop = TrainLoop(new, train, dev, cfg, log=log)
        result = loop.run()
        _load_rows(new, loop.best_state)
    finally:
        with torch.no_grad():
            for key, p in params.items():
                if key in axis:
                    p[:t].copy_(snapshot[key][:t])  # old tasks' rows, bit for bit
                elif not p.requires_grad:
                    p.copy_(snapshot[key])  # frozen (untouched; restored for certainty)
                p.requires_grad_(flags[key])
    seconds = time.perf_counter() - t0
    new.eval()
    report = OnboardReport(
        task=name,
        task_id=t,
        tasks=new.tasks.names,
        train_rows=len(train["label"]),
        dev_rows=0 if dev is None else len(dev["label"]),
        trainable_params=int(trainable),
        train_shared=train_shared,
        seconds=seconds,
        steps=result.step,
        best_step=result.best_step,
        dev_auc=float(result.best_metric) if math.isfinite(result.best_metric) else math.nan,
        history=result.history,
    )
    return new, report


def _check_only_task(arrays: dict[str, np.ndarray], t: int, name: str, split: str) -> None:
    ids = np.asarray(arrays["task_id"])
    wrong = np.flatnonzero(ids != t)
    if len(wrong):
        raise OnboardError(
            f"{split} row {int(wrong[0])} has task id {int(ids[wrong[0]])}; onboarding trains on "
            f"rows of the new task {name!r} (id {t}) only"
        )


def _load_rows(model: RelevanceClassifier, state: dict[str, torch.Tensor] | None) -> None:
    """Copy the loop's best trainable state back into the model (same keys, same shapes)."""
    if state is None:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].device, params[key].dtype))


def onboard_config(data_dir: str | Path, overrides: list[str] | None = None, seed: int = 0):
    """A validated TrainConfig for onboarding: DEFAULT_OVERRIDES, then `a.b=value` overrides."""
    from pipeline.config import build_config

    d = copy.deepcopy(DEFAULT_OVERRIDES)
    d["data"] = {"train_root": str(data_dir), "dev_root": str(data_dir)}
    d["seed"] = seed
    return build_config(d, overrides)


def add_task(
    ckpt_dir: str | Path,
    name: str,
    data_dir: str | Path,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    train_shared: bool = False,
    max_rows: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> OnboardReport:
    """Onboard task `name` onto the checkpoint at `ckpt_dir`; write the result to `out_dir`.

    Data: `data_dir/train/task=<name>/` (and `data_dir/dev/task=<name>/` for model selection,
    optional), or `data_dir/task=<name>/` (train only). Rows that cannot be trained on go to
    `<out_dir>.quarantine/<split>.parquet` with their reason. The result is an ordinary
    checkpoint (it exports, evaluates and registers like any other); its config's
    extra["onboarded"] lists the onboarding runs.
    """
    from features.tokenize import PairTokenizer
    from models.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.local_data import read_task, split_valid, to_arrays

    check_task_name(name)
    ckpt_dir, data_dir, out_dir = Path(ckpt_dir), Path(data_dir), Path(out_dir)
    if out_dir.resolve() == ckpt_dir.resolve():
        raise OnboardError(f"out_dir {out_dir} must differ from the source checkpoint")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise OnboardError(
            f"max_rows (--onboard-max-rows) must be an integer >= 1, got {max_rows!r}"
        )
    # The training config first: a bad override fails before anything is read or written.
    cfg = onboard_config(data_dir, overrides, seed)
    roots = {"train": data_dir / "train", "dev": data_dir / "dev"}
    if not roots["train"].is_dir():
        roots = {"train": data_dir}
    model, ckpt_cfg = load_checkpoint(ckpt_dir)
    if name in model.tasks:
        raise OnboardError(
            f"task {name!r} already exists in {ckpt_dir} (id {model.tasks.id(name)}); "
            f"tasks: {model.tasks.names}"
        )
    tasks = TaskRegistry([*model.tasks.names, name])
    tok = PairTokenizer(
        ckpt_dir,
        ckpt_cfg.get("max_length", 128),
        pad_to_max=True,
        task_prefix=bool(ckpt_cfg.get("task_prefix", False)),
    )
    arrays: dict[str, dict | None] = {"train": None, "dev": None}
    quarantined = 0
    for split, root in roots.items():
        if split == "dev" and not (root / f"task={name}").is_dir():
            continue
        good, bad = split_valid(read_task(root, name, max_rows, sample_seed=seed))
        if len(bad):
            qdir = out_dir.with_name(out_dir.name + ".quarantine")
            qdir.mkdir(parents=True, exist_ok=True)
            bad.to_parquet(qdir / f"{split}.parquet", index=False)
            quarantined += len(bad)
            if log:
                log(f"{len(bad)} {split} row(s) quarantined to {qdir / (split + '.parquet')}")
        if len(good) == 0:
            raise OnboardError(f"no usable {split} rows for task {name!r} under {root}")
        arrays[split] = to_arrays(good, tok, tasks)
    new, report = onboard(model, name, arrays["train"], arrays["dev"], cfg, train_shared, log)
    report.quarantined = quarantined
    extra = dict(ckpt_cfg.get("extra") or {})
    history = [h for h in extra.get("onboarded", []) if isinstance(h, dict)]
    summary = {k: v for k, v in report.to_dict().items() if k not in ("history", "out_dir")}
    extra["onboarded"] = [*history, {**summary, "source": str(ckpt_dir)}]
    save_checkpoint(new, out_dir, ckpt_cfg.get("max_length", 128), ckpt_dir, extra)
    report.out_dir = str(out_dir)
    return report


def resolve_checkpoint(uri: str | Path, tmp: Path) -> Path:
    """A local checkpoint dir for a folder or an MLflow URI (pipeline.model_uri's forms)."""
    from pipeline.model_uri import resolve_model_dir
    from pipeline.predict import find_checkpoint

    if not str(uri).startswith(("models:/", "runs:/")) and not Path(str(uri)).is_dir():
        raise OnboardError(f"--from {str(uri)!r}: no such directory")
    local = resolve_model_dir(uri, dst=None if Path(str(uri)).exists() else tmp)
    found = find_checkpoint(local)
    if found is None:
        raise OnboardError(f"no adrel checkpoint (config.json) found at {uri}")
    return found
