"""Reference methods that wrap no layer: full fine-tuning and a frozen encoder (heads only).

Both leave the encoder's architecture untouched, so the "merge" of any task is the encoder as
it is (its own weights, fine-tuned or not) plus that task's head.
"""

from __future__ import annotations

from torch import nn

from models.adapters.base import AdapterLinear, TaskRouter
from models.config import AdapterConfig


class _NoWrap(AdapterLinear):
    wraps = False

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, router: TaskRouter):
        raise TypeError(f"the {cfg.variant!r} variant wraps no layer; inject_adapters skips it")

    @classmethod
    def num_params(cls, cfg: AdapterConfig, d_in: int, d_out: int) -> int:
        return 0  # no adapter parameters; see the class docstring for what trains


class FullFineTuning(_NoWrap):
    """Every encoder weight trains (plus the per-task heads): the quality reference."""

    freezes_base = False


class HeadsOnly(_NoWrap):
    """The encoder stays frozen; only the per-task heads train: the floor any adapter must beat."""

    freezes_base = True
