"""Per-task LoRA: an independent LoRA (A_t, B_t) for every task, nothing shared but the base.

h = W0·x + b + (α/r) · B_t · A_t · dropout(x)    A_t: (r, d_in), B_t: (d_out, r)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.adapters.base import AdapterLinear, TaskRouter
from models.config import AdapterConfig


class PerTaskLoRALinear(AdapterLinear):
    """T independent rank-r LoRAs; a mixed-task batch is one masked pair of matmuls."""

    task_params = ("lora_A", "lora_B")

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, router: TaskRouter):
        super().__init__(base, cfg, router)
        T, r = cfg.num_tasks, cfg.r
        self.lora_A = nn.Parameter(torch.empty(T, r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(T, self.out_features, r))
        self.reset_parameters()
        self.to(device=base.weight.device)

    def reset_parameters(self) -> None:
        for t in range(self.cfg.num_tasks):
            nn.init.kaiming_uniform_(self.lora_A[t], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def adapter_delta(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        T, r = self.cfg.num_tasks, self.cfg.r
        mid = (1,) * (x.dim() - 2)
        # Project onto every task's A_t at once (T·r is small), keep each example's own block
        # (a one-hot mask, so other tasks get exactly zero gradient), then read back through
        # the stacked B_t: no per-example weights, no loop over task groups.
        z = F.linear(self.drop(x), self.lora_A.reshape(T * r, self.in_features))  # (B, ..., T·r)
        own = F.one_hot(task_ids, T).to(z.dtype).view(B, *mid, T, 1)  # (B, ..., T, 1)
        u = (z.unflatten(-1, (T, r)) * own).flatten(-2)  # (B, ..., T·r)
        B_cat = self.lora_B.permute(1, 0, 2).reshape(self.out_features, T * r)
        return F.linear(u, B_cat) * self.cfg.scaling

    def delta_weight(self, task: int) -> torch.Tensor:
        """ΔW_t = (α/r) · B_t · A_t: (d_out, d_in)."""
        return self.lora_B[task] @ self.lora_A[task] * self.cfg.scaling

    @classmethod
    def num_params(cls, cfg: AdapterConfig, d_in: int, d_out: int) -> int:
        """T·r·(d_in + d_out)."""
        return cfg.num_tasks * cfg.r * (d_in + d_out)
