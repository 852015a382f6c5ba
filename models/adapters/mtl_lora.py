"""The MTL-LoRA layer (Yang et al., AAAI 2025), exactly per the formula.

z   = A · dropout(x)                       A: (r, d_in), shared
z_t = Λ_t · z                              Λ_t: (r,) diagonal or (r, r)
B_t = Σ_i softmax(w_t / τ)_i · B_i         B_i: (d_out, r), shared; w_t: (n,)
h   = W0·x + b + (α/r) · B_t · z_t
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.adapters.base import AdapterLinear, TaskRouter, init_mixing
from models.config import AdapterConfig


class MTLLoRALinear(AdapterLinear):
    task_params = ("lora_lambda", "lora_w")

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, router: TaskRouter):
        super().__init__(base, cfg, router)
        r, n, T = cfg.r, cfg.n_up, cfg.num_tasks
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features))
        lam_shape = (T, r) if cfg.lambda_type == "diag" else (T, r, r)
        self.lora_lambda = nn.Parameter(torch.empty(lam_shape))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, r))
        self.lora_w = nn.Parameter(torch.empty(T, n))
        self.reset_parameters()
        self.to(device=base.weight.device)

    def reset_parameters(self) -> None:
        # As LoRA/the authors: kaiming-uniform A, zero B (adapted model == frozen model at
        # init), identity Λ_t, mixing logits per cfg.mix_init.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        with torch.no_grad():
            if self.cfg.lambda_type == "diag":
                self.lora_lambda.fill_(1.0)
            else:
                self.lora_lambda.copy_(torch.eye(self.cfg.r).expand_as(self.lora_lambda))
            init_mixing(self.lora_w, self.cfg)

    def mixing(self) -> torch.Tensor:
        """softmax(w_t / τ) for every task: (T, n)."""
        return torch.softmax(self.lora_w / self.cfg.tau, dim=-1)

    def adapter_delta(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        r, n = self.cfg.r, self.cfg.n_up
        mid = (1,) * (x.dim() - 2)
        z = F.linear(self.drop(x), self.lora_A)  # (B, ..., r): x·Aᵀ once for the whole batch
        if self.cfg.lambda_type == "diag":
            z = z * self.lora_lambda[task_ids].view(B, *mid, r)  # λ_t per example
        else:
            lam = self.lora_lambda[task_ids]  # (B, r, r), tiny
            z = torch.einsum("bsr,bqr->bsq", z.reshape(B, -1, r), lam).reshape(z.shape)
        # B_t·z_t = Σ_i m_{t,i} B_i·z_t. Scale z_t by each example's n mixing weights and hit
        # the concatenated [B_1 … B_n] (d_out, n·r) with one matmul: no per-example B_t is
        # built, no loop over task groups, and mixed-task batches cost the same as single-task.
        m = self.mixing()[task_ids].view(B, *mid, n, 1)  # (B, ..., n, 1)
        u = (z.unsqueeze(-2) * m).flatten(-2)  # (B, ..., n·r)
        B_cat = self.lora_B.permute(1, 0, 2).reshape(self.out_features, n * r)
        return F.linear(u, B_cat) * self.cfg.scaling

    def task_up(self, task: int) -> torch.Tensor:
        """B_t · Λ_t for one task: (d_out, r)."""
        B_t = torch.einsum("n,nor->or", self.mixing()[task], self.lora_B)
        lam = self.lora_lambda[task]
        return B_t * lam if self.cfg.lambda_type == "diag" else B_t @ lam

    def delta_weight(self, task: int) -> torch.Tensor:
        """ΔW_t = (α/r) · B_t · Λ_t · A: (d_out, d_in)."""
        return self.task_up(task) @ self.lora_A * self.cfg.scaling

    @classmethod
    def num_params(cls, cfg: AdapterConfig, d_in: int, d_out: int) -> int:
        """r·d_in + T·r (diag Λ; T·r² full) + n·d_out·r + T·n."""
        lam = cfg.num_tasks * cfg.r * (1 if cfg.lambda_type == "diag" else cfg.r)
        return cfg.r * d_in + lam + cfg.n_up * d_out * cfg.r + cfg.num_tasks * cfg.n_up
