"""MultiLoRA: n LoRA modules with learnable scales, summed (one task-agnostic update).

h = W0·x + b + (α/r) · Σ_i s_i · B_i · A_i · dropout(x)
A_i: (r, d_in), B_i: (d_out, r), s_i: scalar (init 1)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.adapters.base import AdapterLinear, TaskRouter
from models.config import AdapterConfig


class MultiLoRALinear(AdapterLinear):
    """n = cfg.n_up modules of rank r each; the same update for every task."""

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, router: TaskRouter):
        super().__init__(base, cfg, router)
        n, r = cfg.n_up, cfg.r
        self.lora_A = nn.Parameter(torch.empty(n, r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, r))
        self.lora_scale = nn.Parameter(torch.ones(n))
        self.reset_parameters()
        self.to(device=base.weight.device)

    def reset_parameters(self) -> None:
        for i in range(self.cfg.n_up):
            nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        with torch.no_grad():
            self.lora_scale.fill_(1.0)

    def _cat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[A_1; …; A_n] (n·r, d_in) and [s_1·B_1 … s_n·B_n] (d_out, n·r)."""
        n, r = self.cfg.n_up, self.cfg.r
        A_cat = self.lora_A.reshape(n * r, self.in_features)
        B = self.lora_B * self.lora_scale.view(n, 1, 1)
        return A_cat, B.permute(1, 0, 2).reshape(self.out_features, n * r)

    def adapter_delta(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        # All n modules in two matmuls: one over the stacked A_i, one over the scaled B_i.
        A_cat, B_cat = self._cat()
        z = F.linear(self.drop(x), A_cat)  # (B, ..., n·r)
        return F.linear(z, B_cat) * self.cfg.scaling

    def delta_weight(self, task: int) -> torch.Tensor:
        """ΔW = (α/r) · Σ_i s_i · B_i · A_i, whatever the task: (d_out, d_in)."""
        A_cat, B_cat = self._cat()
        return B_cat @ A_cat * self.cfg.scaling

    @classmethod
    def num_params(cls, cfg: AdapterConfig, d_in: int, d_out: int) -> int:
        """n·r·(d_in + d_out) + n."""
        return cfg.n_up * cfg.r * (d_in + d_out) + cfg.n_up
