"""`adrel demo` on a workdir it used before: resume an unfinished run, else start the next."""

from __future__ import annotations

import json

from jobs.demo import _demo_run_number


def _run(root, n: int, finished: bool | None) -> None:
    d = root / f"demo-{n}"
    d.mkdir(parents=True)
    if finished is not None:
        state = {"stages": {}, **({"finished": {"summary": "s"}} if finished else {})}
        (d / "state.json").write_text(json.dumps(state))


def test_first_next_and_resumed_runs(tmp_path):
    root = tmp_path / "retrain"
    assert _demo_run_number(root) == 1  # nothing there yet
    _run(root, 1, finished=True)
    assert _demo_run_number(root) == 2
    _run(root, 2, finished=False)  # killed midway: the next demo resumes it
    assert _demo_run_number(root) == 2
    (root / "demo-2" / "state.json").write_text(json.dumps({"finished": {"summary": "s"}}))
    _run(root, 10, finished=None)  # started, killed before its first stage was recorded
    (root / "demo-notes").mkdir()
    assert _demo_run_number(root) == 10  # numeric order, not "demo-10" < "demo-2"
