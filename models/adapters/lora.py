"""LoRA baselines: one low-rank update shared by every task (heads stay per task).

h = W0·x + b + (α/r) · B · A · dropout(x)        A: (r, d_in), B: (d_out, r)

`lora_task_prefix` is the same layer; the task reaches the model only through its input text
(the task name prepended to the query, see features.tokenize.prefix_queries).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.adapters.base import AdapterLinear, TaskRouter
from models.config import AdapterConfig


class LoRALinear(AdapterLinear):
    """One shared LoRA: task-agnostic, so its merge is the same matrix for every task."""

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, router: TaskRouter):
        super().__init__(base, cfg, router)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.r))
        self.reset_parameters()
        self.to(device=base.weight.device)

    def reset_parameters(self) -> None:
        # Kaiming-uniform A, zero B: the adapted model equals the frozen one at init.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def adapter_delta(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.drop(x), self.lora_A)  # (B, ..., r)
        return F.linear(z, self.lora_B) * self.cfg.scaling  # (B, ..., d_out)

    def delta_weight(self, task: int) -> torch.Tensor:
        """ΔW = (α/r) · B · A, whatever the task: (d_out, d_in)."""
        return self.lora_B @ self.lora_A * self.cfg.scaling

    @classmethod
    def num_params(cls, cfg: AdapterConfig, d_in: int, d_out: int) -> int:
        """r·d_in + d_out·r."""
        return cfg.r * (d_in + d_out)


class LoRATaskPrefixLinear(LoRALinear):
    """The shared LoRA told the task in its input: tokenisation prepends the task name."""

    task_prefix = True
