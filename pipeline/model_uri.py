"""Resolve any `--model` value to a local directory: a folder, `runs:/`, or `models:/` URIs.

Every adrel command that takes `--model` goes through here, so all of them accept the same
forms:

    /path/to/dir                    used as is
    runs:/<run_id>/<artifact path>  that run's artifacts
    models:/<name>/<version>        one registered version
    models:/<name>/latest           the newest version
    models:/<name>@<alias>          the version an alias points to (e.g. champion)

MLflow artifacts are downloaded into a local folder; the tracking URI comes from the argument,
else MLFLOW_TRACKING_URI (MLflow's own default otherwise). Serving imports this module, so it
never imports torch or transformers, and mlflow only when a URI needs it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_MODELS_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")
_RUNS_RE = re.compile(r"^runs:/(?P<run_id>[^/]+)(?:/(?P<path>.*))?$")


class ModelURIError(ValueError):
    """A `--model` value is malformed or points at nothing."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed `--model` value (nothing resolved or downloaded yet)."""

    uri: str
    kind: str  # "local" | "runs" | "models"
    path: str | None = None  # local folder, or artifact path inside a run
    run_id: str | None = None
    name: str | None = None
    version: str | None = None  # a number or "latest"
    alias: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """Where a `--model` value landed locally, and which registered version it was."""

    uri: str
    path: Path
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None

    @property
    def label(self) -> str:
        """A short human/version label: `name/version`, `runs:/id/...`, or the folder."""
        if self.name and self.version:
            return f"{self.name}/{self.version}"
        return self.uri


def parse_model_uri(uri: str | os.PathLike) -> ModelRef:
    """Parse without touching MLflow; raises ModelURIError naming the bad value."""
    s = str(uri).strip()
    if not s:
        raise ModelURIError("--model is empty: give a directory or an MLflow model URI")
    if s.startswith("models:/"):
        m = _MODELS_RE.match(s)
        if not m:
            raise ModelURIError(
                f"bad model URI {s!r}: use models:/<name>/<version>, models:/<name>/latest "
                "or models:/<name>@<alias>"
            )
        version = m["version"]
        if version is not None and version != "latest" and not version.isdigit():
            raise ModelURIError(f"bad model URI {s!r}: version {version!r} is not a number")
        return ModelRef(s, "models", name=m["name"], version=version, alias=m["alias"])
    if s.startswith("runs:/"):
        m = _RUNS_RE.match(s)
        if not m or not m["run_id"]:
            raise ModelURIError(f"bad run URI {s!r}: use runs:/<run_id>/<artifact path>")
        return ModelRef(s, "runs", path=(m["path"] or "").strip("/"), run_id=m["run_id"])
    if "://" in s or s.startswith(("models:", "runs:")):
        raise ModelURIError(
            f"unsupported model location {s!r}: give a local directory, runs:/..., or models:/..."
        )
    return ModelRef(s, "local", path=s)


def require_store(tracking_uri: str) -> None:
    """Reading from a local sqlite store that is not there is a mistake (a mistyped path, the
    wrong work directory), not a request for a new empty store: MLflow would create one."""
    from pipeline.tracking import sqlite_path

    path = sqlite_path(tracking_uri)
    if path is not None and str(path) != ":memory:" and not path.is_file():
        raise ModelURIError(
            f"no MLflow store at {tracking_uri!r}: {path} does not exist; point --tracking-uri "
            "(or MLFLOW_TRACKING_URI) at the store the model is registered in"
        )


def _client(tracking_uri: str | None):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    require_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def registered_version(ref: ModelRef, tracking_uri: str | None = None):
    """The MLflow ModelVersion a `models:/` ref points to (alias and `latest` resolved)."""
    from mlflow.exceptions import MlflowException

    client, _ = _client(tracking_uri)
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        if ref.version == "latest":
            versions = client.search_model_versions(f"name = '{ref.name}'")
            if not versions:
                raise ModelURIError(f"registered model {ref.name!r} has no versions ({ref.uri})")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as e:
        raise ModelURIError(f"cannot resolve {ref.uri}: {e.message}") from None


def resolve_model(
    uri: str | os.PathLike,
    tracking_uri: str | None = None,
    dst: str | os.PathLike | None = None,
) -> ResolvedModel:
    """Resolve `uri` to a local directory. MLflow artifacts are downloaded into `dst` when
    given, else into the model cache (a registered version, a finished run), else (a run still
    in progress) into a temporary folder removed when this process exits."""
    ref = parse_model_uri(uri)
    if ref.kind == "local":
        p = Path(ref.path).expanduser()
        if not p.is_dir():
            raise ModelURIError(f"--model {ref.uri!r}: no such directory")
        return ResolvedModel(ref.uri, p.resolve())
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    client, turi = _client(tracking_uri)
    name = version = run_id = None
    cached: Path | None = None
    if ref.kind == "models":
        mv = registered_version(ref, tracking_uri)
        name, version, run_id = mv.name, str(mv.version), mv.run_id
        artifact_uri = f"models:/{mv.name}/{mv.version}"
        if dst is None:  # a registered version never changes: download it once per machine
            cached = _cache_dir(turi, f"{mv.name}-v{version}")
    else:
        run_id, artifact_uri = ref.run_id, ref.uri
        try:
            status = client.get_run(ref.run_id).info.status
        except MlflowException as e:
            raise ModelURIError(f"cannot resolve {ref.uri}: {e.message}") from None
        if dst is None and status == "FINISHED":  # a finished run's artifacts stay as they are
            digest = hashlib.sha256(ref.path.encode()).hexdigest()[:10]
            cached = _cache_dir(turi, f"run-{ref.run_id}-{digest}")
    hit = _cache_hit(cached) if cached is not None else None
    if hit is not None:
        return ResolvedModel(ref.uri, hit, name, version, ref.alias, run_id)
    if cached is not None and cached.exists():  # files deleted from it by hand: replaced
        _discard(cached)
    if dst is not None:
        out = Path(dst)
    elif cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix=cached.name + ".tmp-", dir=cached.parent))
    else:
        out = _temp_download_dir()
    out.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(out), tracking_uri=turi, registry_uri=turi
            )
        )
    except MlflowException as e:
        raise ModelURIError(f"cannot download {ref.uri}: {e.message}") from None
    except OSError as e:
        raise ModelURIError(f"cannot download {ref.uri}: {e}") from None
    if cached is not None:
        local = _publish_cache(out, local, cached)
        evict_cache(keep=cached)
    return ResolvedModel(ref.uri, local, name, version, ref.alias, run_id)


def resolve_model_dir(
    uri: str | os.PathLike, dst: str | os.PathLike | None = None, tracking_uri: str | None = None
) -> Path:
    """Just the local directory of `resolve_model`."""
    return resolve_model(uri, tracking_uri=tracking_uri, dst=dst).path


_COMPLETE = ".adrel-complete"
# The model cache (registered versions and finished runs' artifacts, downloaded once per
# machine): ADREL_MODEL_CACHE, else $TMPDIR/adrel-model-cache-<uid>. Past
# ADREL_MODEL_CACHE_MAX_MB (default 20 GiB) the least recently used entries go, except those
# used in the last hour (a process may be about to load them).
DEFAULT_CACHE_MAX_MB = 20 * 1024
CACHE_MIN_IDLE_S = 3600.0
CACHE_STALE_DOWNLOAD_S = 24 * 3600.0  # an unfinished download older than this was abandoned
_TEMP_DOWNLOADS: list[Path] = []


def cache_root() -> Path:
    return Path(
        os.environ.get("ADREL_MODEL_CACHE")
        or os.path.join(
            tempfile.gettempdir(),
            f"adrel-model-cache-{os.getuid() if hasattr(os, 'getuid') else 0}",
        )
    )


def _cache_dir(tracking_uri: str | None, key: str) -> Path:
    # Keyed by tracking store too: two sqlite files may both hold "adrel-x" version 1.
    store = hashlib.sha256(str(tracking_uri).encode()).hexdigest()[:12]
    return cache_root() / store / key


def _cache_hit(cached: Path) -> Path | None:
    """The payload folder of a complete cache entry, its use recorded; None when the entry is
    missing or was evicted meanwhile."""
    stamp = cached / _COMPLETE
    try:
        local = Path(stamp.read_text().strip())
    except OSError:
        return None
    with contextlib.suppress(OSError):  # a read-only cache is used as it is
        stamp.touch()  # the last use, for eviction
    return local if local.is_dir() else None


def _discard(entry: Path) -> bool:
    """Remove a cache entry; renamed first, so no reader sees a half-removed one as whole."""
    trash = entry.with_name(f"{entry.name}.discarded-{os.getpid()}-{time.monotonic_ns()}")
    try:
        entry.rename(trash)
    except OSError:  # gone already, or another process is removing it
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _temp_download_dir() -> Path:
    """A folder for a download that is not cached (a run still in progress), removed when
    this process exits."""
    if not _TEMP_DOWNLOADS:
        atexit.register(_remove_temp_downloads)
    out = Path(tempfile.mkdtemp(prefix="adrel-model-"))
    _TEMP_DOWNLOADS.append(out)
    return out


def _remove_temp_downloads() -> None:
    while _TEMP_DOWNLOADS:
        shutil.rmtree(_TEMP_DOWNLOADS.pop(), ignore_errors=True)


def evict_cache(
    keep: Path | None = None, max_mb: float | None = None, min_idle_s: float = CACHE_MIN_IDLE_S
) -> list[Path]:
    """Remove the least recently used complete cache entries until the cache fits in max_mb
    (default: ADREL_MODEL_CACHE_MAX_MB, else DEFAULT_CACHE_MAX_MB); entries used in the last
    min_idle_s seconds and `keep` stay. Returns the removed entries."""
    if max_mb is None:
        raw = os.environ.get("ADREL_MODEL_CACHE_MAX_MB") or DEFAULT_CACHE_MAX_MB
        try:
            max_mb = float(raw)
        except ValueError:
            max_mb = float("nan")
        if not 0 <= max_mb < float("inf"):
            raise ModelURIError(
                f"ADREL_MODEL_CACHE_MAX_MB={raw!r} is not a number of megabytes >= 0"
            )
    root = cache_root()
    entries = []  # (last use, size, path)
    for stamp in root.glob(f"*/*/{_COMPLETE}"):
        entry = stamp.parent
        try:
            used = stamp.stat().st_mtime
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        except OSError:  # removed meanwhile by another process
            continue
        entries.append((used, size, entry))
    total = sum(size for _, size, _ in entries)
    removed = []
    now = time.time()
    # What a process killed mid-download or mid-removal left behind.
    for left in [*root.glob("*/*.tmp-*"), *root.glob("*/*.discarded-*")]:
        with contextlib.suppress(OSError):
            if now - left.stat().st_mtime > CACHE_STALE_DOWNLOAD_S:
                shutil.rmtree(left)
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= max_mb * 1024 * 1024:
            break
        if keep is not None and entry == keep:
            continue
        try:  # its use as of now, not as of the scan: a reader may have just touched it
            if now - (entry / _COMPLETE).stat().st_mtime < min_idle_s:
                continue
        except OSError:
            continue
        if _discard(entry):
            total -= size
            removed.append(entry)
    return removed


def _publish_cache(tmp: Path, local: Path, cached: Path) -> Path:
    """Move a finished download into the cache (first writer wins) and return its folder."""
    final = cached / local.resolve().relative_to(tmp.resolve())
    (tmp / _COMPLETE).write_text(str(final))  # written before the rename: a visible cache is whole
    try:
        tmp.rename(cached)
    except OSError:  # another process cached it first: use theirs, drop ours
        shutil.rmtree(tmp, ignore_errors=True)
        hit = _cache_hit(cached)
        if hit is None:
            raise ModelURIError(
                f"model cache {cached} is incomplete; delete it and retry"
            ) from None
        return hit
    return final


def find_payload(root: str | os.PathLike, marker: str) -> Path:
    """The folder under `root` holding `marker` (the root itself, or inside an MLflow model).

    A registered adrel model is an MLflow model folder (MLmodel, artifacts/<key>/...); the
    adrel payload (checkpoint or export) sits inside it. The shallowest match wins.
    """
    root = Path(root)
    if (root / marker).is_file():
        return root
    hits = sorted(root.rglob(marker), key=lambda p: (len(p.parts), str(p)))
    if not hits:
        raise ModelURIError(f"{root} holds no {marker}: not the kind of model this command needs")
    return hits[0].parent


def task_model_versions(
    prefix: str, alias: str, tasks: list[str] | None = None, tracking_uri: str | None = None
) -> dict[str, str]:
    """`{task: "models:/<prefix>-<task>/<version>"}` for every task model carrying `alias`.

    Serves `models:/<prefix>@<alias>` meaning "the alias of every per-task model". Only models
    registered as adrel task models (tag adrel.kind=task) count, so `<prefix>-mtl` is skipped.
    """
    from mlflow.exceptions import MlflowException

    client, _ = _client(tracking_uri)
    out: dict[str, str] = {}
    for rm in client.search_registered_models(f"name LIKE '{prefix}-%'"):
        if rm.tags.get("adrel.kind") != "task" or not rm.name.startswith(prefix + "-"):
            continue
        task = rm.tags.get("adrel.task") or rm.name[len(prefix) + 1 :]
        if tasks is not None and task not in tasks:
            continue
        try:
            mv = client.get_model_version_by_alias(rm.name, alias)
        except MlflowException:
            continue  # this task has no version with that alias
        out[task] = f"models:/{rm.name}/{mv.version}"
    return out


def registered_model_exists(name: str, tracking_uri: str | None = None) -> bool:
    from mlflow.exceptions import MlflowException

    client, _ = _client(tracking_uri)
    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
