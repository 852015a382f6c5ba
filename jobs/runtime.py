"""Process-level set-up for jobs: environment defaults, the Ray cluster, MLflow locations.

Library code below jobs/ never calls ray.init or picks a tracking URI: jobs do, through here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

DEFAULT_WORKDIR = "adrel-work"


def cpu_count_arg(text: str) -> int:
    """argparse type of --num-cpus: a whole number of CPUs, at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of CPUs, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"at least 1 CPU, got {n}")
    return n


def set_env_defaults() -> None:
    """Offline model loading, no telemetry, a loopback-only local Ray (unless told otherwise)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Jobs print their own progress (rows/s, steps, ETA); Ray Data's per-operator bars would
    # bury it in a non-interactive log. RAY_DATA_DISABLE_PROGRESS_BARS=0 brings them back.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    state_api: bool = False,
    env: dict[str, str] | None = None,
    **kwargs,
):
    """Connect to `address` (or RAY_ADDRESS), else start a local cluster on 127.0.0.1.

    state_api: the local cluster also runs Ray's dashboard process (loopback, a free port),
    which serves the state API. Ray Train needs it: its placement-group cleaner polls the
    controller's state there, and without it warns every second for the whole run.
    env: variables Ray's own processes read when they start (e.g. Serve's ingress settings):
    set in this process, so that a local cluster inherits them, and in the job's runtime
    environment.
    Returns True when this call started or connected Ray (the caller should shut it down).
    """
    import ray

    set_env_defaults()
    if ray.is_initialized():
        return False
    os.environ.update(env or {})
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": {**_worker_env(), **(env or {})}}
    with _keep_sigterm_handler():
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **kwargs)
            return True
        _init_local(num_cpus, state_api, runtime_env, kwargs)
    return True


@contextlib.contextmanager
def _keep_sigterm_handler():
    """ray.init installs a SIGTERM handler of its own in the driver (a C++ one that dumps a
    stack and exits): the command's handler (jobs.cli, which stops the run as Ctrl-C does,
    so its cleanup runs) is put back."""
    in_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if in_main else None
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


def _init_local(num_cpus, state_api: bool, runtime_env: dict, kwargs: dict) -> None:
    import ray

    # A local head node on a loaded machine can miss Ray's fixed 30 s registration window;
    # starting again usually succeeds, so try a few times before giving up.
    for attempt in range(1, 4):
        try:
            ray.init(
                # "local": a new cluster; without it ray.init attaches to the newest cluster
                # on the machine (/tmp/ray/ray_current_cluster), e.g. another user's.
                address="local",
                num_cpus=num_cpus,
                **_dashboard_options(state_api),
                runtime_env=runtime_env,
                log_to_driver=True,
                **kwargs,
            )
            break
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 3:
                raise
            ray.shutdown()


def free_loopback_port(n: int = 1) -> int:
    """The first of `n` consecutive TCP ports free on 127.0.0.1 right now.

    The OS picks the first from its ephemeral range, which lies outside Ray's worker port
    range (10002-19999 by default), so servers started on these ports do not meet Ray's.
    """
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65536:
            continue
        socks = []
        try:
            for port in range(first, first + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return first
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


def _dashboard_options(enabled: bool) -> dict:
    if not enabled:
        return {"include_dashboard": False}
    port = free_loopback_port()  # several local clusters may coexist on one machine
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}


def _worker_env() -> dict[str, str]:
    keys = (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "MLFLOW_DISABLE_TELEMETRY",
        "MLFLOW_TRACKING_URI",
        "DO_NOT_TRACK",
        "RAY_DATA_DISABLE_PROGRESS_BARS",
    )
    return {k: os.environ[k] for k in keys if k in os.environ}


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def default_tracking_uri(workdir: str | Path) -> str:
    """sqlite:////abs/workdir/mlflow.db: the embedded default tracking store."""
    return "sqlite:///" + str((Path(workdir) / "mlflow.db").resolve())


def default_artifact_root(workdir: str | Path) -> str:
    return (Path(workdir) / "mlartifacts").resolve().as_uri()


def tracking_uri(workdir: str | Path, configured: str | None = None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else the sqlite file under the work directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)
