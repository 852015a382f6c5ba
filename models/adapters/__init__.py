"""Adapter methods behind one registry: variant name -> AdapterLinear subclass (a strategy).

Each class states, besides its layer maths, whether it wraps layers (`wraps`), keeps the base
frozen (`freezes_base`), wants the task name in the input text (`task_prefix`), which of its
parameters hold one row per task (`task_params`) and its parameter count (`num_params`).
"""

from models.adapters.base import AdapterLinear, TaskRouter, check_task_ids
from models.adapters.full import FullFineTuning, HeadsOnly
from models.adapters.lora import LoRALinear, LoRATaskPrefixLinear
from models.adapters.moelora import MoELoRALinear
from models.adapters.mtl_lora import MTLLoRALinear
from models.adapters.multilora import MultiLoRALinear
from models.adapters.per_task_lora import PerTaskLoRALinear

ADAPTERS: dict[str, type[AdapterLinear]] = {
    "mtl_lora": MTLLoRALinear,
    "lora": LoRALinear,
    "lora_task_prefix": LoRATaskPrefixLinear,
    "multilora": MultiLoRALinear,
    "moelora": MoELoRALinear,
    "per_task_lora": PerTaskLoRALinear,
    "full": FullFineTuning,
    "heads_only": HeadsOnly,
}


def adapter_class(variant: str) -> type[AdapterLinear]:
    """The registered class of `variant`; unknown names raise naming the known ones."""
    try:
        return ADAPTERS[variant]
    except KeyError:
        raise ValueError(
            f"unknown adapter variant {variant!r}; known: {sorted(ADAPTERS)}"
        ) from None


def uses_task_prefix(variant: str) -> bool:
    """Whether inputs of this variant carry the task name in front of the query text."""
    return adapter_class(variant).task_prefix


__all__ = [
    "ADAPTERS",
    "AdapterLinear",
    "FullFineTuning",
    "HeadsOnly",
    "LoRALinear",
    "LoRATaskPrefixLinear",
    "MTLLoRALinear",
    "MoELoRALinear",
    "MultiLoRALinear",
    "PerTaskLoRALinear",
    "TaskRouter",
    "adapter_class",
    "check_task_ids",
    "uses_task_prefix",
]
