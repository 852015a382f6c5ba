"""Task names and the task registry: names map to stable integer ids saved with every model."""

from __future__ import annotations

import re
from collections.abc import Iterable

TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class TaskNameError(ValueError):
    """A task name breaks the pattern (letters, digits, '_', '-'; no separators, no '..')."""


def check_task_name(name: object) -> str:
    if not isinstance(name, str) or not TASK_NAME_RE.match(name):
        raise TaskNameError(
            f"invalid task name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit (no path separators, no '..')"
        )
    return name


class TaskRegistry:
    """Ordered task names with stable ids: adding a task never renumbers the existing ones."""

    def __init__(self, names: Iterable[str] = ()):
        self._ids: dict[str, int] = {}
        for name in names:
            self.add(name)

    def add(self, name: str) -> int:
        check_task_name(name)
        if name not in self._ids:
            self._ids[name] = len(self._ids)
        return self._ids[name]

    def id(self, name: str) -> int:
        try:
            return self._ids[name]
        except KeyError:
            raise KeyError(f"unknown task {name!r}; known tasks: {self.names}") from None

    def name(self, task_id: int) -> str:
        names = self.names
        if not 0 <= task_id < len(names):
            raise KeyError(f"unknown task id {task_id}; valid ids are 0..{len(names) - 1}")
        return names[task_id]

    @property
    def names(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskRegistry) and self._ids == other._ids

    def to_dict(self) -> dict[str, int]:
        return dict(self._ids)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> TaskRegistry:
        items = sorted(d.items(), key=lambda kv: kv[1])
        if [i for _, i in items] != list(range(len(items))):
            raise ValueError(f"task registry ids must be 0..N-1 without gaps, got {d}")
        return cls(name for name, _ in items)
