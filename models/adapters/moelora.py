"""MoELoRA with a task gate: n LoRA experts mixed by a task-specific softmax gate.

g_t = softmax(e_t)                              e_t: (n,) gate logits of task t
h   = W0·x + b + (α/r) · Σ_i g_{t,i} · B_i · A_i · dropout(x)
A_i: (r, d_in), B_i: (d_out, r) shared experts

The gate reads only the task (not the token), so for a fixed task the update is one matrix
ΔW_t = (α/r) Σ_i g_{t,i} B_i A_i: mergeable per task like MTL-LoRA. The task embedding and the
gate's linear map are folded into one (T, n) table of logits (a learned embedding followed by
a linear gate of width n spans exactly these tables).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.adapters.base import AdapterLinear, TaskRouter, init_mixing
from models.config import AdapterConfig


class MoELoRALinear(AdapterLinear):
    """n = cfg.n_up experts of rank r; gate init follows cfg.mix_init / cfg.mix_init_std."""

    task_params = ("lora_gate",)

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, router: TaskRouter):
        super().__init__(base, cfg, router)
        n, r, T = cfg.n_up, cfg.r, cfg.num_tasks
        self.lora_A = nn.Parameter(torch.empty(n, r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, r))
        self.lora_gate = nn.Parameter(torch.empty(T, n))
        self.reset_parameters()
        self.to(device=base.weight.device)

    def reset_parameters(self) -> None:
        for i in range(self.cfg.n_up):
            nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        init_mixing(self.lora_gate, self.cfg)

    def gates(self) -> torch.Tensor:
        """softmax over experts for every task: (T, n)."""
        return torch.softmax(self.lora_gate, dim=-1)

    def _B_cat(self) -> torch.Tensor:
        n, r = self.cfg.n_up, self.cfg.r
        return self.lora_B.permute(1, 0, 2).reshape(self.out_features, n * r)  # (d_out, n·r)

    def adapter_delta(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        n, r = self.cfg.n_up, self.cfg.r
        mid = (1,) * (x.dim() - 2)
        z = F.linear(self.drop(x), self.lora_A.reshape(n * r, self.in_features))  # (B, ..., n·r)
        g = self.gates()[task_ids].view(B, *mid, n, 1)  # (B, ..., n, 1): each example's gate
        u = (z.unflatten(-1, (n, r)) * g).flatten(-2)  # (B, ..., n·r)
        return F.linear(u, self._B_cat()) * self.cfg.scaling

    def delta_weight(self, task: int) -> torch.Tensor:
        """ΔW_t = (α/r) · Σ_i g_{t,i} · B_i · A_i: (d_out, d_in)."""
        B_t = self.lora_B * self.gates()[task].view(-1, 1, 1)  # (n, d_out, r)
        A_cat = self.lora_A.reshape(-1, self.in_features)
        return B_t.permute(1, 0, 2).reshape(self.out_features, -1) @ A_cat * self.cfg.scaling

    @classmethod
    def num_params(cls, cfg: AdapterConfig, d_in: int, d_out: int) -> int:
        """n·r·(d_in + d_out) + T·n."""
        return cfg.n_up * cfg.r * (d_in + d_out) + cfg.num_tasks * cfg.n_up
