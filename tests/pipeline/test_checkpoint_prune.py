"""After a successful run only the checkpoints Ray Train kept stay in the run directory."""

from __future__ import annotations

from pathlib import Path

from ray.train import Checkpoint, Result

from pipeline.ray_train import prune_unregistered_checkpoints


def _ckpt(run_dir: Path, name: str) -> Checkpoint:
    d = run_dir / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights")
    return Checkpoint.from_directory(str(d))


def test_only_the_checkpoints_ray_kept_survive(tmp_path):
    run_dir = tmp_path / "run"
    kept = _ckpt(run_dir, "checkpoint-0000020-a1b2c3")
    final = _ckpt(run_dir, "checkpoint-0000040-final-d4e5f6")
    _ckpt(run_dir, "checkpoint-0000030-0rphan")  # uploaded by an attempt that then died
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    (run_dir / "checkpoint-notes").write_text("a file, not a checkpoint directory")
    (run_dir / "other").mkdir()
    result = Result(
        metrics={"step": 40},
        checkpoint=final,
        error=None,
        path=str(run_dir),
        best_checkpoints=[(kept, {}), (final, {})],
    )
    logged: list[str] = []

    assert prune_unregistered_checkpoints(result, logged.append) == ["checkpoint-0000030-0rphan"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint-0000020-a1b2c3",
        "checkpoint-0000040-final-d4e5f6",
        "checkpoint-notes",
        "checkpoint_manager_snapshot.json",
        "other",
    ]
    assert (run_dir / "checkpoint-0000040-final-d4e5f6" / "model.safetensors").is_file()
    assert logged == []
    # Nothing left to remove the second time.
    assert prune_unregistered_checkpoints(result, logged.append) == []


def test_a_missing_run_directory_removes_nothing(tmp_path):
    result = Result(
        metrics={}, checkpoint=None, error=None, path=str(tmp_path / "gone"), best_checkpoints=[]
    )
    assert prune_unregistered_checkpoints(result) == []
