"""RelevanceClassifier: adapted encoder + pooling + one logistic head per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from features.tasks import TaskRegistry
from models.adapters import TaskRouter, check_task_ids
from models.config import POOLINGS, AdapterConfig, ConfigError
from models.inject import adapter_layers, inject_adapters


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, S, H) -> (B, H): the first token, or the mean over real tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class RelevanceClassifier(nn.Module):
    """One logit per example, for the example's own task.

    Heads are stored as one (T, H) weight and (T,) bias so a mixed-task batch is scored with
    a gather instead of a loop over tasks.
    """

    def __init__(
        self,
        encoder: nn.Module,
        adapter: AdapterConfig,
        tasks: TaskRegistry,
        pooling: str = "mean",
        head_dropout: float = 0.1,
        base_model: str = "",
    ):
        super().__init__()
        errors = []
        if pooling not in POOLINGS:
            errors.append(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if len(tasks) != adapter.num_tasks:
            errors.append(
                f"adapter.num_tasks={adapter.num_tasks} but the task registry has {len(tasks)} tasks"
            )
        if errors:
            raise ConfigError(errors)
        self.encoder = encoder
        self.adapter_cfg = adapter
        self.tasks = tasks
        self.pooling = pooling
        self.base_model = base_model
        self.router = TaskRouter(len(tasks))
        self.adapted = inject_adapters(encoder, adapter, self.router)
        hidden = encoder.config.hidden_size
        self.head_dropout = nn.Dropout(head_dropout) if head_dropout > 0 else nn.Identity()
        self.head_weight = nn.Parameter(torch.randn(len(tasks), hidden) * 0.02)
        self.head_bias = nn.Parameter(torch.zeros(len(tasks)))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        task_ids = check_task_ids(task_ids, self.num_tasks).to(input_ids.device)
        self.router.task_ids = task_ids
        try:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.encoder(**kwargs).last_hidden_state  # (B, S, H)
        finally:
            self.router.task_ids = None
        pooled = self.head_dropout(pool(hidden, attention_mask, self.pooling))  # (B, H)
        w = self.head_weight[task_ids]  # (B, H)
        return (pooled * w).sum(-1) + self.head_bias[task_ids]  # (B,)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None):
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), weight=weights)

    def adapter_layers(self):
        return adapter_layers(self.encoder)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters a checkpoint stores: everything that trains (adapters and heads)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
