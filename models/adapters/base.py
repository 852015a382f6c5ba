"""Base class for an adapter that wraps one frozen nn.Linear and reads task ids from a router."""

from __future__ import annotations

import torch
from torch import nn

from models.config import AdapterConfig


class TaskRouter:
    """Carries the current batch's task ids to every adapted layer.

    The classifier sets `task_ids` around each forward, so callers never thread task ids
    through the Hugging Face encoder's own forward signature.
    """

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.task_ids: torch.Tensor | None = None

    def current(self, batch_size: int) -> torch.Tensor:
        ids = self.task_ids
        if ids is None:
            raise RuntimeError(
                "adapted layer called without task ids; call the classifier with task_ids"
            )
        if ids.shape[0] != batch_size:
            raise ValueError(
                f"task_ids has {ids.shape[0]} entries but the batch has {batch_size} rows"
            )
        return ids


def check_task_ids(task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Validate a (B,) tensor of task ids; raise naming the offending value and position."""
    if task_ids.dim() != 1:
        raise ValueError(
            f"task_ids must be 1-D (one id per example), got shape {tuple(task_ids.shape)}"
        )
    if task_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
    if task_ids.numel():
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= num_tasks:
            bad = lo if lo < 0 else hi
            pos = int((task_ids == bad).nonzero()[0, 0])
            raise ValueError(
                f"task id {bad} at position {pos} is out of range: the model has {num_tasks} "
                f"tasks (valid ids 0..{num_tasks - 1})"
            )
    return task_ids.long()


def init_mixing(logits: torch.Tensor, cfg: AdapterConfig) -> None:
    """Init a (T, n) table of per-task mixing logits in place, per cfg.mix_init."""
    with torch.no_grad():
        if cfg.mix_init == "kaiming":
            bound = 1.0 / logits.shape[-1] ** 0.5
            nn.init.uniform_(logits, -bound, bound)
        elif cfg.mix_init == "random":
            nn.init.normal_(logits, std=cfg.mix_init_std)
        else:
            nn.init.zeros_(logits)


class AdapterLinear(nn.Module):
    """h = base(x) + adapter_delta(x, task_ids); the base layer stays frozen and untouched.

    Subclasses implement `adapter_delta` (the training/unmerged path) and, when the method
    admits a per-task merge, `delta_weight(task)` returning the d_out x d_in update for one task.
    """

    mergeable: bool = True
    # Strategy flags read by injection, tokenisation and onboarding (see models/adapters/*):
    # wraps: the method swaps target linears for this class (False: no layer is wrapped).
    # freezes_base: the encoder's own weights stay frozen (False only for full fine-tuning).
    # task_prefix: the task name is prepended to the query text at tokenisation.
    # task_params: parameters whose first axis is the task id (one row per task).
    wraps: bool = True
    freezes_base: bool = True
    task_prefix: bool = False
    task_params: tuple[str, ...] = ()

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, router: TaskRouter):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"an adapter wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.router = router
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task_ids = self.router.current(x.shape[0])
        return self.base(x) + self.adapter_delta(x, task_ids)

    def adapter_delta(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, task: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no per-task merge")

    @classmethod
    def num_params(cls, cfg: AdapterConfig, d_in: int, d_out: int) -> int:
        """Trainable parameters this method adds to one d_in -> d_out linear layer."""
        raise NotImplementedError(f"{cls.__name__} does not state its parameter count")
