"""Stage bookkeeping for resumable jobs: each stage records completion, outputs and input hashes.

State lives in one JSON file per run (written atomically). A stage whose record exists and
whose input hash is unchanged is skipped on re-run and its recorded outputs are returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path


def _feed_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def file_sha256(path: str | Path) -> str:
    """Full SHA-256 hex digest of one file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    _feed_file(h, Path(path))
    return h.hexdigest()


def hash_path(path: str | Path) -> str:
    """Content hash of a file or directory tree (names, sizes and bytes of every file)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        _feed_file(h, f)
    return h.hexdigest()[:20]


def hash_value(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


class StageLog:
    """Completed stages of one run: {stage: {"inputs": hash, "outputs": {...}, "finished": t}}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state: dict = (
            json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}
        )

    def done(self, stage: str, inputs_hash: str | None = None) -> bool:
        rec = self.state["stages"].get(stage)
        return rec is not None and (inputs_hash is None or rec.get("inputs") == inputs_hash)

    def outputs(self, stage: str) -> dict:
        return self.state["stages"][stage]["outputs"]

    def record(self, stage: str, outputs: dict, inputs_hash: str | None = None) -> None:
        self.state["stages"][stage] = {
            "inputs": inputs_hash,
            "outputs": outputs,
            "finished": time.time(),
        }
        self._write()

    def set(self, key: str, value) -> None:
        self.state[key] = value
        self._write()

    def get(self, key: str, default=None):
        return self.state.get(key, default)

    def run(
        self, stage: str, fn: Callable[[], dict], inputs_hash: str | None = None
    ) -> tuple[dict, bool]:
        """Run `fn` unless the stage is already done with the same inputs; returns (outputs, ran)."""
        if self.done(stage, inputs_hash):
            return self.outputs(stage), False
        outputs = fn()
        self.record(stage, outputs, inputs_hash)
        return outputs, True

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.path)
