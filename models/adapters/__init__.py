"""Adapter methods behind one registry: variant name -> AdapterLinear subclass."""

from models.adapters.base import AdapterLinear, TaskRouter, check_task_ids
from models.adapters.mtl_lora import MTLLoRALinear

ADAPTERS: dict[str, type[AdapterLinear]] = {"mtl_lora": MTLLoRALinear}

__all__ = ["ADAPTERS", "AdapterLinear", "MTLLoRALinear", "TaskRouter", "check_task_ids"]
