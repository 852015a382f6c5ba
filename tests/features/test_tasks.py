from __future__ import annotations

import pytest

from features.tasks import TaskNameError, TaskRegistry, check_task_name


def test_adding_a_task_never_renumbers():
    reg = TaskRegistry(["exact", "broad"])
    reg.add("shopping")
    reg.add("exact")
    assert reg.to_dict() == {"exact": 0, "broad": 1, "shopping": 2}
    assert TaskRegistry.from_dict(reg.to_dict()) == reg
    assert reg.name(2) == "shopping" and reg.id("broad") == 1


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "with space", "x" * 65, None, "-lead"])
def test_bad_task_names_are_refused(bad):
    with pytest.raises(TaskNameError, match="invalid task name"):
        check_task_name(bad)


def test_unknown_lookups_name_the_value():
    reg = TaskRegistry(["a"])
    with pytest.raises(KeyError, match="unknown task 'b'"):
        reg.id("b")
    with pytest.raises(KeyError, match="unknown task id 3"):
        reg.name(3)
    with pytest.raises(ValueError, match="without gaps"):
        TaskRegistry.from_dict({"a": 0, "b": 2})
