"""A crash-surviving lock file: one retrain per registry prefix at a time.

The lock is a file created with O_EXCL holding the owner's pid, host and start time. A lock
whose owner process is gone (same host) or that is older than `stale_after_s` is stale and is
taken over; anything else makes `acquire` raise LockBusy naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


class LockBusy(RuntimeError):
    """Another live run holds the lock."""


class RunLock:
    def __init__(self, path: str | Path, stale_after_s: float = 6 * 3600, owner: str = ""):
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.owner = owner
        self.held = False

    def _info(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "owner": self.owner,
        }

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _is_stale(self, info: dict | None) -> bool:
        if info is None:
            return True  # unreadable or half-written lock: its writer died mid-write
        if time.time() - float(info.get("started", 0)) > self.stale_after_s:
            return True
        if info.get("host") == socket.gethostname():
            return not _pid_alive(int(info.get("pid", -1)))
        return False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if not self._is_stale(info):
                    raise LockBusy(
                        f"another run holds {self.path}: pid {info.get('pid')} on {info.get('host')} "
                        f"({info.get('owner') or 'unnamed'}), started "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('started', 0)))}"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner crashed; take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._info(), f)
            self.held = True
            return self
        raise LockBusy(f"could not take {self.path}: it keeps reappearing")

    def release(self) -> None:
        if self.held:
            info = self.holder()
            if info and info.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
