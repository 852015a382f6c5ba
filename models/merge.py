"""Per-task merge: fold ΔW_t into the frozen weights and return a plain base-architecture model.

Merging is a pure function of the adapted model: it reads weights, never writes them, so the
live multi-task model is untouched (no merge-on-eval).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.classifier import RelevanceClassifier, pool


class MergeError(RuntimeError):
    """A merge produced non-finite weights or the variant cannot be merged per task."""


class MergedTaskModel(nn.Module):
    """A plain encoder of the base architecture plus one task's head: logits (B,)."""

    def __init__(
        self, encoder: nn.Module, head_weight: torch.Tensor, head_bias: torch.Tensor, pooling: str
    ):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(head_weight.shape[0], 1)
        with torch.no_grad():
            self.head.weight.copy_(head_weight.view(1, -1))
            self.head.bias.copy_(head_bias.view(1))

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.pooling)).squeeze(-1)


@torch.no_grad()
def merged_encoder_state(model: RelevanceClassifier, task: int | str) -> dict[str, torch.Tensor]:
    """The base encoder's state dict (base-architecture key names) with ΔW_t folded in."""
    t = model.tasks.id(task) if isinstance(task, str) else int(task)
    if not 0 <= t < model.num_tasks:
        raise ValueError(f"task id {t} out of range 0..{model.num_tasks - 1}")
    layers = model.adapter_layers()
    state = {}
    for key, value in model.encoder.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers or (owner.endswith(".base") and owner[: -len(".base")] in layers):
            continue  # adapter parameters and wrapped base weights are handled below
        state[key] = value.detach().clone()
    for name, layer in layers.items():
        if not layer.mergeable:
            raise MergeError(f"layer {name} ({type(layer).__name__}) cannot be merged per task")
        w0 = layer.base.weight
        delta = layer.delta_weight(t).to(torch.float64)
        merged = (w0.to(torch.float64) + delta).to(w0.dtype)
        if not torch.isfinite(merged).all():
            raise MergeError(f"merging task {t} into {name} produced non-finite weights")
        state[f"{name}.weight"] = merged.clone()
        if layer.base.bias is not None:
            state[f"{name}.bias"] = layer.base.bias.detach().clone()
    return state


@torch.no_grad()
def merge_task(model: RelevanceClassifier, task: int | str) -> MergedTaskModel:
    """A plain model of the base architecture for one task (loaded strict=True)."""
    t = model.tasks.id(task) if isinstance(task, str) else int(task)
    state = merged_encoder_state(model, t)
    enc_cfg = copy.deepcopy(model.encoder.config)
    plain = type(model.encoder)(enc_cfg)
    plain.load_state_dict(state, strict=True)
    plain.eval()
    return MergedTaskModel(
        plain,
        model.head_weight[t].detach().clone(),
        model.head_bias[t].detach().clone(),
        model.pooling,
    ).eval()
