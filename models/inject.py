"""Swap target nn.Linear layers of any Hugging Face encoder for adapter layers."""

from __future__ import annotations

import re

from torch import nn

from models.adapters import ADAPTERS, AdapterLinear, TaskRouter
from models.config import AdapterConfig, ConfigError


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear modules matched by the target suffixes; unknown targets raise."""
    names = linear_names(model)
    unmatched = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unmatched:
        suffixes = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in names})
        raise ConfigError(
            [
                f"target module(s) {unmatched} match no nn.Linear in {type(model).__name__}; "
                f"linear layers present (by suffix): {suffixes}"
            ]
        )
    return [n for n in names if any(_matches(n, t) for t in targets)]


def inject_adapters(model: nn.Module, cfg: AdapterConfig, router: TaskRouter) -> list[str]:
    """Freeze `model` and replace each target linear by the configured adapter, in place.

    Variants that wrap no layer leave the model as it is (trainable for full fine-tuning).
    Returns the names of the adapted modules.
    """
    if cfg.variant not in ADAPTERS:
        raise ConfigError([f"variant must be one of {sorted(ADAPTERS)}, got {cfg.variant!r}"])
    layer_cls = ADAPTERS[cfg.variant]
    for p in model.parameters():
        p.requires_grad_(not layer_cls.freezes_base)
    if not layer_cls.wraps:
        return []  # full fine-tuning / heads only: the encoder is used as it is
    names = find_targets(model, cfg.targets)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, layer_cls(base, cfg, router))
    return names


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
