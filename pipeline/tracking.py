"""MLflow for training runs: where to track, flattened params, system info, run start/resume.

Everything goes through an explicit `MlflowClient` and run id (no global active run), so the
rank-0 training worker can reopen the run it started before a restart.
"""

from __future__ import annotations

import math
import os
import platform
import socket
from pathlib import Path
from typing import Any

RUN_NAME_TAG = "adrel.run_name"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def default_tracking_uri(workdir: str | Path) -> str:
    """sqlite:////abs/workdir/mlflow.db: the embedded default tracking store."""
    return "sqlite:///" + str((Path(workdir) / "mlflow.db").resolve())


def resolve_tracking_uri(workdir: str | Path, configured: str | None = None) -> str:
    """The config value, else MLFLOW_TRACKING_URI, else the sqlite file in the work directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI (query string dropped), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0])


def artifact_location(tracking_uri: str, workdir: str | Path | None = None) -> str | None:
    """Where a new experiment keeps artifacts: under the workdir for a local (sqlite/file)
    store (without one: beside the sqlite file), the server's choice otherwise. Never relative
    (MLflow's default for a sqlite store is ./mlartifacts of whatever directory a process runs
    in; workers run in other directories)."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    if workdir is None:
        db = sqlite_path(tracking_uri)
        if db is None:
            return None
        workdir = db.parent
    return (Path(workdir) / "mlartifacts").resolve().as_uri()


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": "0.001"}; lists and None as strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM_CHARS]
    return out


def system_info(device: Any = None, world_size: int = 1) -> dict[str, str]:
    """Library versions and the hardware a run trained on (logged as tags)."""
    import ray
    import torch
    import transformers

    info = {
        "system.python": platform.python_version(),
        "system.torch": torch.__version__,
        "system.transformers": transformers.__version__,
        "system.ray": ray.__version__,
        "system.platform": platform.platform(),
        "system.hostname": socket.gethostname(),
        "system.cpu_count": str(os.cpu_count()),
        "system.torch_threads": str(torch.get_num_threads()),
        "system.world_size": str(world_size),
        "system.device": str(device) if device is not None else "cpu",
    }
    try:
        import mlflow

        info["system.mlflow"] = mlflow.__version__
    except ImportError:
        pass
    if device is not None and getattr(device, "type", "") == "cuda":
        info["system.gpu"] = torch.cuda.get_device_name(device)
    return info


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(c, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created (with `artifact_location`) when missing."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(
    c, exp_id: str, run_name: str, run_id: str | None = None, tags: dict | None = None
) -> str:
    """Reopen `run_id` (a resumed training run) or create a run; returns the run id."""
    from mlflow.entities import RunStatus

    if run_id:
        c.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id
    run = c.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    return run.info.run_id


def log_params(c, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Finite numeric metrics at `step` in one batch (NaN/inf and non-numbers are skipped)."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [
        Metric(k, float(v), ts, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


def set_tags(c, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(c, run_id: str, status: str = "FINISHED") -> None:
    c.set_terminated(run_id, status=status)
