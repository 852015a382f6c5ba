"""The training loop: one explicit loop over mixed-task batches, knowing nothing about Ray.

AdamW on the trainable parameters only (adapters + heads), warmup then linear/cosine decay,
gradient clipping and accumulation, bf16 autocast on CUDA (fp32 elsewhere), periodic dev
evaluation (per-task ROC-AUC and loss, macro average), best-state selection on the macro AUC,
optional early stopping. Side effects (reporting, checkpointing, tracking) go through
`Callback`s, called on every rank at the same steps so a distributed wrapper can synchronise.

When torch.distributed is initialised the model may arrive wrapped in DDP: gradients are
averaged by DDP, evaluation is split across ranks and gathered, and `state_dict()` gathers
every rank's sampler/RNG state (a collective: call it on all ranks).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from features.tokenize import TOKEN_COLUMNS, trim_batch
from pipeline.config import TrainConfig
from pipeline.sampler import TaskSampler

# Trainable parameters that AdamW must not decay: decay pulls λ_t toward 0 (away from its
# identity init) and mixing/gate logits toward uniform; biases and norms as usual.
NO_DECAY_NAMES = ("lora_lambda", "lora_w", "lora_gate", "lora_scale")
ARRAY_COLUMNS = (*TOKEN_COLUMNS, "task_id", "label", "weight")


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (model init must match on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The classifier inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over trainable parameters: with and without weight decay."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in NO_DECAY_NAMES or leaf.endswith("bias") or p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(total: int, warmup: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step s: linear warmup, then linear/cosine decay."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return f


def total_steps(cfg: TrainConfig, global_rows: int, world_size: int) -> int:
    """Optimizer steps of the run: max_steps, else ceil(epochs · rows / global batch)."""
    if cfg.optim.max_steps is not None:
        return cfg.optim.max_steps
    per_step = cfg.optim.batch_size * cfg.optim.grad_accum * world_size
    return max(1, math.ceil(cfg.optim.epochs * global_rows / per_step))


class Callback:
    """Hooks called on every rank at the same steps (override what you need)."""

    def on_train_start(self, loop: TrainLoop) -> None: ...

    def on_log(self, loop: TrainLoop, step: int, logs: dict[str, float]) -> None: ...

    def on_eval(
        self, loop: TrainLoop, step: int, metrics: dict[str, float], improved: bool
    ) -> None: ...

    def on_checkpoint(self, loop: TrainLoop, step: int) -> None: ...

    def on_train_end(self, loop: TrainLoop, result: LoopResult) -> None: ...


@dataclass
class LoopResult:
    """How the run ended: steps, best macro AUC and its step, last metrics, timing."""

    step: int
    total_steps: int
    start_step: int
    best_step: int
    best_metric: float
    stopped_early: bool
    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


class TrainLoop:
    """Trains `model` (a RelevanceClassifier, maybe DDP-wrapped) on numpy row arrays.

    train / dev: dicts of ARRAY_COLUMNS, fixed-width token arrays (N, L) int64, task_id (N,)
    int64, label (N,) float32, weight (N,) float32. task_counts: global per-task train row
    counts (all ranks), so every rank mixes tasks alike; defaults to the local counts.
    """

    def __init__(
        self,
        model: nn.Module,
        train: dict[str, np.ndarray],
        dev: dict[str, np.ndarray] | None,
        cfg: TrainConfig,
        callbacks: Sequence[Callback] = (),
        task_counts: np.ndarray | None = None,
        log: Callable[[str], None] | None = print,
    ):
        self.model = model
        self.module = unwrap(model)
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.log = log
        self.device = next(self.module.parameters()).device
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.train = _check_arrays(train, "train")
        self.dev = _check_arrays(dev, "dev") if dev is not None else None
        T = self.module.num_tasks
        local = np.bincount(self.train["task_id"], minlength=T)
        counts = local if task_counts is None else np.asarray(task_counts)
        self.task_counts = counts
        self.total_steps = total_steps(cfg, int(counts.sum()), self.world_size)
        self.sampler = TaskSampler(
            self.train["task_id"],
            T,
            cfg.sampling.strategy,
            cfg.sampling.temperature,
            seed=cfg.seed,
            stream=self.rank,
            counts=counts,
        )
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.module, o.weight_decay), lr=o.lr, betas=tuple(o.betas)
        )
        warmup = (
            o.warmup_steps if o.warmup_steps is not None else int(o.warmup_ratio * self.total_steps)
        )
        self.warmup = min(warmup, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, self.warmup, o.schedule, o.min_lr_ratio)
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.step = 0
        self.start_step = 0
        self.best_metric = -math.inf
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.evals_since_best = 0
        self.history: list[dict] = []
        self.last_metrics: dict[str, float] = {}
        self.timing = {"data_s": 0.0, "fwd_bwd_s": 0.0, "optim_s": 0.0, "examples": 0, "steps": 0}
        torch.manual_seed(cfg.seed * 1_000 + 17 + self.rank)  # dropout stream per rank

    # ----- the loop -----

    def run(self) -> LoopResult:
        """Train from self.step to total_steps (or an early stop); returns the outcome."""
        self.start_step = self.step
        for cb in self.callbacks:
            cb.on_train_start(self)
        stopped = self._stopped_early()
        window_loss, window_n, window_ex, window_t0 = 0.0, 0, 0, self._busy_s()
        while self.step < self.total_steps and not stopped:
            loss, n_ex = self._train_step()
            self.step += 1
            window_loss, window_n, window_ex = window_loss + loss, window_n + 1, window_ex + n_ex
            if self.step % self.cfg.tracking.log_every_steps == 0 or self.step == self.total_steps:
                dt = max(1e-9, self._busy_s() - window_t0)
                logs = self._log_line(window_loss / window_n, window_ex * self.world_size / dt)
                for cb in self.callbacks:
                    cb.on_log(self, self.step, logs)
                window_loss, window_n, window_ex, window_t0 = 0.0, 0, 0, self._busy_s()
            if self.dev is not None and (
                self.step % self.cfg.eval.every_steps == 0 or self.step == self.total_steps
            ):
                stopped = self._eval_and_select()
            if self.step % self.cfg.checkpoint.every_steps == 0 and self.step < self.total_steps:
                for cb in self.callbacks:
                    cb.on_checkpoint(self, self.step)
        if self.best_state is None:  # no dev set: the last state is the result
            self.best_state = self.trainable_state()
            self.best_step = self.step
        result = LoopResult(
            step=self.step,
            total_steps=self.total_steps,
            start_step=self.start_step,
            best_step=self.best_step,
            best_metric=self.best_metric,
            stopped_early=stopped,
            metrics=dict(self.last_metrics),
            history=list(self.history),
            timing=dict(self.timing),
        )
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, examples)."""
        self.model.train()
        accum, total, n_ex = self.cfg.optim.grad_accum, 0.0, 0
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = self._batch(self.sampler.next_batch(self.cfg.optim.batch_size))
            t1 = time.perf_counter()
            # DDP: all-reduce gradients only in the backward of the step's last micro-batch.
            sync = micro == accum - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    logits = self.model(
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["task_id"],
                        batch["token_type_ids"],
                    )  # (B,)
                    loss = self.module.loss(logits, batch["label"], batch["weight"])
                (loss / accum).backward()
            total += float(loss.detach())
            n_ex += len(batch["label"])
            self.timing["data_s"] += t1 - t0
            self.timing["fwd_bwd_s"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.timing["optim_s"] += time.perf_counter() - t2
        self.timing["examples"] += n_ex
        self.timing["steps"] += 1
        return total / accum, n_ex

    def _busy_s(self) -> float:
        """Seconds spent in training steps so far (data + compute; evaluation excluded)."""
        return self.timing["data_s"] + self.timing["fwd_bwd_s"] + self.timing["optim_s"]

    def _batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows `idx` as tensors on the model's device, token arrays trimmed to the batch."""
        rows = trim_batch({c: self.train[c][idx] for c in ARRAY_COLUMNS})
        return {
            c: torch.from_numpy(rows[c]).to(self.device, non_blocking=True) for c in ARRAY_COLUMNS
        }

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _log_line(self, loss: float, ex_per_s: float) -> dict[str, float]:
        loss = self._mean_across_ranks(loss)
        lr = self.scheduler.get_last_lr()[0]
        logs = {"train/loss": loss, "train/lr": lr, "train/examples_per_s": ex_per_s}
        if self.rank == 0 and self.log is not None:
            done = self.step - self.start_step
            eta = self._busy_s() / max(1, done) * (self.total_steps - self.step)
            self.log(
                f"step {self.step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{ex_per_s:.1f} ex/s  ETA {_hms(eta)}"
            )
        return logs

    def _mean_across_ranks(self, x: float) -> float:
        if not self.distributed:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # ----- evaluation and selection -----

    def _eval_and_select(self) -> bool:
        """Evaluate, keep the best state on macro AUC; True when early stopping triggers."""
        metrics = self.evaluate()
        macro = metrics.get("dev/macro_auc", math.nan)
        improved = not math.isnan(macro) and macro > self.best_metric + self.cfg.eval.min_delta
        if improved:
            self.best_metric, self.best_step = macro, self.step
            self.best_state = self.trainable_state()
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        if math.isfinite(self.best_metric):
            metrics["dev/best_macro_auc"] = self.best_metric
        self.last_metrics = metrics
        self.history.append({"step": self.step, **metrics})
        if self.rank == 0 and self.log is not None:
            per_task = "  ".join(
                f"{k.removeprefix('dev/auc/')} {v:.3f}"
                for k, v in metrics.items()
                if k.startswith("dev/auc/")
            )
            self.log(
                f"eval step {self.step}: macro AUC {macro:.4f} (best {self.best_metric:.4f} @ "
                f"{self.best_step})  loss {metrics.get('dev/loss', math.nan):.4f}  [{per_task}]"
            )
        for cb in self.callbacks:
            cb.on_eval(self, self.step, metrics, improved)
        return self._stopped_early()

    def _stopped_early(self) -> bool:
        p = self.cfg.eval.patience
        return p is not None and self.evals_since_best >= p

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Per-task ROC-AUC and loss on dev, macro averages; identical on every rank."""
        assert self.dev is not None
        self.model.eval()
        n = len(self.dev["label"])
        mine = np.arange(self.rank, n, self.world_size)  # this rank's share of dev rows
        # Sorting by length keeps padding low inside each evaluation batch.
        mine = mine[np.argsort(self.dev["attention_mask"][mine].sum(1), kind="stable")]
        logits = np.empty(len(mine), dtype=np.float32)
        bs = self.cfg.eval.batch_size
        for s in range(0, len(mine), bs):
            rows = trim_batch({c: self.dev[c][mine[s : s + bs]] for c in ARRAY_COLUMNS})
            t = {c: torch.from_numpy(rows[c]).to(self.device) for c in TOKEN_COLUMNS + ("task_id",)}
            with self._autocast():
                out = self.module(
                    t["input_ids"], t["attention_mask"], t["task_id"], t["token_type_ids"]
                )
            logits[s : s + bs] = out.float().cpu().numpy()
        self.model.train()
        idx, logits = self._gather(mine, logits)
        return dev_metrics(
            logits,
            self.dev["label"][idx],
            self.dev["weight"][idx],
            self.dev["task_id"][idx],
            self.module.tasks.names,
        )

    def _gather(self, idx: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.distributed:
            return idx, logits
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, (idx, logits))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # ----- state -----

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of every trainable tensor (adapters and heads)."""
        return {
            k: v.detach().to("cpu", copy=True) for k, v in self.module.trainable_state().items()
        }

    def state_dict(self) -> dict:
        """Everything needed to continue exactly; a collective when distributed (all ranks call)."""
        local = {"sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":  # dropout on the GPU draws from the device's generator
            local["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        per_rank = [local]
        if self.distributed:
            per_rank = [None] * self.world_size
            dist.all_gather_object(per_rank, local)
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "world_size": self.world_size,
            "model": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ranks": per_rank,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "best_state": self.best_state,
            "evals_since_best": self.evals_since_best,
            "history": self.history,
            "last_metrics": self.last_metrics,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (this rank's sampler/RNG; a changed world size re-seeds them)."""
        from models.checkpoint import load_trainable

        load_trainable(self.module, state["model"], source="train_state")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.best_metric = float(state["best_metric"])
        self.best_step = int(state["best_step"])
        self.best_state = state["best_state"]
        self.evals_since_best = int(state["evals_since_best"])
        self.history = list(state["history"])
        self.last_metrics = dict(state["last_metrics"])
        ranks = state["ranks"]
        if len(ranks) == self.world_size:
            self.sampler.load_state_dict(ranks[self.rank]["sampler"])
            torch.set_rng_state(ranks[self.rank]["torch_rng"])
            if self.device.type == "cuda" and "cuda_rng" in ranks[self.rank]:
                torch.cuda.set_rng_state(ranks[self.rank]["cuda_rng"], self.device)
        else:
            # Another world size: the shards differ, so the old positions mean nothing here.
            self.sampler = TaskSampler(
                self.train["task_id"],
                self.module.num_tasks,
                self.cfg.sampling.strategy,
                self.cfg.sampling.temperature,
                seed=self.cfg.seed + self.step,
                stream=self.rank,
                counts=self.task_counts,
            )
            if self.rank == 0 and self.log is not None:
                self.log(
                    f"resuming with {self.world_size} workers instead of {len(ranks)}: "
                    "task sampling re-seeded"
                )


def dev_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    task_ids: np.ndarray,
    task_names: list[str],
) -> dict[str, float]:
    """dev/auc/<task>, dev/loss/<task>, dev/macro_auc (mean over tasks with both classes),
    dev/macro_loss and dev/loss (all rows, weighted)."""
    from sklearn.metrics import roc_auc_score

    logits = logits.astype(np.float64)
    # Weighted binary cross-entropy from logits, stable for large |logit|.
    bce = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
    out: dict[str, float] = {}
    aucs, losses = [], []
    for t, name in enumerate(task_names):
        m = task_ids == t
        if not m.any():
            continue
        loss_t = float(np.average(bce[m], weights=weights[m])) if weights[m].sum() > 0 else math.nan
        out[f"dev/loss/{name}"] = loss_t
        losses.append(loss_t)
        if len(np.unique(labels[m])) == 2:
            auc = float(roc_auc_score(labels[m], logits[m]))
            out[f"dev/auc/{name}"] = auc
            aucs.append(auc)
    out["dev/macro_auc"] = float(np.mean(aucs)) if aucs else math.nan
    out["dev/macro_loss"] = float(np.nanmean(losses)) if losses else math.nan
    out["dev/loss"] = float(np.average(bce, weights=weights)) if weights.sum() > 0 else math.nan
    return out


def _check_arrays(d: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    missing = [c for c in ARRAY_COLUMNS if c not in d]
    if missing:
        raise ValueError(f"{name} arrays lack columns {missing}; have {sorted(d)}")
    n = len(d["label"])
    bad = {c: len(d[c]) for c in ARRAY_COLUMNS if len(d[c]) != n}
    if bad:
        raise ValueError(f"{name} columns differ in length: label has {n} rows, {bad}")
    if n == 0:
        raise ValueError(f"{name} has no rows")
    out = {c: np.ascontiguousarray(d[c]) for c in ARRAY_COLUMNS}
    for c in (*TOKEN_COLUMNS, "task_id"):
        out[c] = out[c].astype(np.int64, copy=False)
    for c in ("label", "weight"):
        out[c] = out[c].astype(np.float32, copy=False)
    return out


def _hms(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
