"""Test helpers for adapter models: non-zero adapter init (zero B makes merge tests trivial)."""

from __future__ import annotations

import torch

from features.tasks import TaskRegistry
from models.checkpoint import build_model
from models.config import AdapterConfig


def perturb_adapters(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every trainable tensor a random non-zero value (B, Λ, w, heads alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.trainable_state().items()):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tiny_model(encoder_dir, tasks=("a", "b", "c"), seed=0, **adapter_kw):
    torch.manual_seed(seed)
    cfg = AdapterConfig(num_tasks=len(tasks), **adapter_kw)
    model = build_model(str(encoder_dir), cfg, TaskRegistry(tasks), head_dropout=0.0)
    perturb_adapters(model, seed)
    return model.eval()


def token_batch(batch: int = 4, seq: int = 12, vocab: int = 30522, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):  # ragged rows: padding must be respected
        mask[i, seq - i :] = 0
    types = torch.zeros(batch, seq, dtype=torch.long)
    types[:, seq // 2 :] = 1
    return ids, mask, types
