"""Output folders written in one piece: `staged_output`.

An --out that is not empty is refused unless `overwrite`, and then replaced whole. The new
result is written into a hidden folder next to it, `.<out>.staging-<host>-<pid>-<id>`, and
renamed into place at the end, so a run that fails part-way or is stopped leaves --out as it
was, never half-written or mixed with an older result. A folder left by a run that was killed
outright is removed by a later run once its process is gone (same host) or after a day.
Used by `adrel data synth`, `data split` and `data validate`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STALE_STAGING_S = 24 * 3600  # no live run leaves its staging folder untouched for a day


def check_out_path(out: Path) -> None:
    """Refuse an output path that is, or lies under, something other than a directory."""
    p = out
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    if p == out and not p.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if not p.is_dir():
        raise ValueError(f"--out {out} cannot be created: {p} is not a directory")


def check_output(
    out: Path,
    overwrite: bool,
    owns: Callable[[str], bool],
    result: str,
    inputs: tuple[Path, ...] = (),
) -> None:
    """Refuse an `out` that overlaps an input, is not a directory or is not empty.

    With `overwrite` a non-empty `out` is accepted when it holds only a `result` of the same
    kind (every entry name passes `owns`): it is replaced whole, so it must hold nothing else.
    """
    for inp in inputs:
        if out == inp or inp in out.parents:
            raise ValueError(f"--out {out} must not be the input directory or inside it")
        if out in inp.parents:
            raise ValueError(f"--input {inp} is inside --out {out}, which this run would replace")
    check_out_path(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ValueError(
            f"--out {out} is not empty (it holds {entries[:3]}); choose a new --out or pass "
            f"--overwrite to replace it"
        )
    foreign = [name for name in entries if not owns(name)]
    if foreign:
        raise ValueError(
            f"--out {out} holds {foreign[:5]}, which is not part of {result}; refusing to "
            f"replace it (choose a new --out)"
        )


@contextmanager
def staged_output(
    out: Path,
    overwrite: bool,
    owns: Callable[[str], bool],
    result: str,
    inputs: tuple[Path, ...] = (),
) -> Iterator[Path]:
    """Check `out` (`check_output`) and yield a new hidden folder next to it to write into.

    When the block ends without error that folder becomes `out` (an old result is replaced
    whole); when it fails the folder is removed and `out` is left as it was.
    """
    check_output(out, overwrite, owns, result, inputs)
    remove_stale_staging(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / (
            f".{out.name}.staging-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        staging.mkdir()
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written: {e}") from None
    try:
        yield staging
        # Again: another run may have written `out` meanwhile.
        check_output(out, overwrite, owns, result, inputs)
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a failed run's partial result


def remove_stale_staging(out: Path, max_age_s: float = STALE_STAGING_S) -> list[Path]:
    """Remove the hidden folders next to `out` that killed runs left (staging, or a result
    swapped out): those of a process that is gone (same host), and any untouched for
    `max_age_s` (a live run's never are)."""
    removed = []
    if not out.parent.is_dir():
        return removed
    now = time.time()
    for d in out.parent.glob(f".{out.name}.staging-*"):
        try:
            if not _owner_alive(d.name) or now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d)
                removed.append(d)
        except OSError:
            continue  # removed meanwhile, or not ours to remove
    return removed


def _owner_alive(name: str) -> bool:
    """Whether the process named in a staging folder's name may still be writing it."""
    parts = name.rsplit(".staging-", 1)[-1].rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname():
        return True  # another host's, or an old-style name: left to the age rule
    return pid_alive(parts[1])


def pid_alive(pid) -> bool:
    """False only when no process `pid` exists on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(staging: Path, out: Path) -> None:
    """Make the finished folder `staging` the folder `out`, replacing a previous one whole:
    readers see the old or the new, never half of one. One atomic exchange where the system
    has it; else two renames (the old one put back if the second fails). The previous result
    is then removed; a kill before that leaves it as `.<out>.staging-old-<id>`, which
    `remove_stale_staging` (and batch scoring's own cleaner) removes later."""
    if not (out.exists() or out.is_symlink()):
        os.rename(staging, out)
        return
    if _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous result
        return
    old = out.parent / f".{out.name}.staging-old-{uuid.uuid4().hex[:12]}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
