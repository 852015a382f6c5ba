"""Typed, validated configuration of the online scoring service, grouped by concern.

`ServeConfig.build(**fields)` reports every bad field and value at once (ServeConfigError).
Nothing here imports Ray, ONNX Runtime or the model code: the CLI validates before starting.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from features.tasks import check_task_name
from pipeline.config_errors import format_validation_error

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class ServeConfigError(ValueError):
    """The service configuration is invalid; the message lists every bad field and value."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid serve configuration:\n  - " + "\n  - ".join(self.errors))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Section):
    """Dynamic batching of concurrent requests into one model call per task (`@serve.batch`).

    max_batch_size: most items scored in one model call; 1 turns batching off.
    batch_wait_ms: how long a batch waits for more requests once its first one arrived. Every
        request pays it when the replica is idle; while the model is busy, requests gather
        anyway (batches waiting for the model are merged into the next call), so the default
        is 0: score at once when idle, in full batches when busy.
    max_concurrent_batches: model calls a replica runs at once (model slots). Default 2: one
        call's tokenisation and Python work overlap the other's compute, and on CPU the cores
        are split between the two (`ServeConfig.ort_threads`), which uses them better than
        one call over all of them: on 2 cores, 158 vs 118 requests/s at 16 clients, p50 at
        one client 14.2 vs 11.6 ms (benchmarks/bench_serving_load.py, `--concurrent-batches`).
    """

    max_batch_size: int = Field(16, ge=1, le=4096)
    batch_wait_ms: float = Field(0.0, ge=0, le=1000)
    max_concurrent_batches: int = Field(2, ge=1, le=64)

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000.0


class LimitsConfig(_Section):
    """Request limits: anything larger is refused with 413 before it reaches the model.

    max_items: items per request. max_text_chars: characters per text field (the model
    reads at most max_length tokens anyway; this bounds tokenisation work per item).
    max_body_bytes: size of the request body (checked from Content-Length).
    """

    max_items: int = Field(256, ge=1, le=100_000)
    max_text_chars: int = Field(4096, ge=1, le=1_000_000)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1024**3)


class ServeConfig(_Section):
    """What the service loads, where it listens and how it scales.

    model: an export directory (with index.json, or one task's directory), or an MLflow URI
        (`models:/adrel-<task>@<alias>`, `models:/adrel@champion` = every adrel-<task>).
    tasks: serve only these tasks (default: every task the source holds).
    tracking_uri: MLflow tracking URI for `models:/` sources (replicas do not inherit the
        caller's environment, so it travels in the config).
    host/port/allow_remote: where the service listens; a host other than a loopback address
        must be allowed explicitly (the service has no authentication of its own).
    ingress: how requests reach a replica.
        "direct" (default): every replica answers HTTP itself (Ray Serve's direct ingress), on
            ports from `port` up: replica k on port + k, with as many spare ports again for
            replicas that restart (`replica_ports`). No hop through Serve's proxy, which on a
            small CPU host costs more than the model (benchmarks/bench_serving_load.py
            measures both paths side by side). Serve's proxy still runs, on `proxy_port`
            (default: the first port after the replica ports), and spreads requests over
            every replica. Several replicas behind one address: an L4 load balancer over the
            replica ports, or the proxy.
        "proxy": Serve's HTTP proxy listens on `port` and forwards every request to a replica.
    drain_s: how long a stopping replica keeps scoring while its /healthz answers 503, so that
        a load balancer in front can take it out of rotation (0: none in front); after it, new
        requests get 503 and the replica closes once the admitted ones are answered
        (`serving.app.drain`, which `adrel serve` runs on SIGTERM).
    replicas: model replicas (each holds every task's model). num_cpus_per_replica: Ray CPUs
        reserved per replica. intra_op_threads: ONNX Runtime threads per model call (None: the
        replica's cores split between its model slots, see `ort_threads`). providers: "auto"
        (CUDA when usable, else CPU), "cpu" or "cuda".
        solo_session: where the model slots leave a call one thread, keep a second session per
            task for a call that runs alone (nothing else running or waiting), with the
            threads the idle slots would use (`ort_solo_threads`). On 2 cores, p50 at one
            client 13.7–14.4 ms with two threads against 18.3–19.3 with one; two threads per
            call for every call cost 17 % on p99 at 16 clients. Costs a second copy of each
            task's weights in memory (~110 MB for MiniLM-L6 fp32).
        ort_spin_wait: let ORT's threads spin between runs (off: spinning takes the CPU that
        the replica's HTTP handling needs; measured p50 17.3 ms off vs 20.5 on with direct
        ingress, 31 vs 39 through Serve's proxy).
    max_ongoing_requests: requests one replica accepts at once; must allow a full batch to form
        (>= max_batch_size * max_concurrent_batches); default twice that, so the next batch
        gathers while the current one runs.
    access_log: log every request (Serve's access log; off by default: it costs latency).
    reload_interval_s: check the model source this often and swap in a new version when it
        moved (0: only on POST /v1/reload, which the replica asked passes on to the others).
    """

    model: str
    tasks: list[str] | None = None
    tracking_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    ingress: Literal["direct", "proxy"] = "direct"
    proxy_port: int | None = Field(None, ge=1, le=65535)
    drain_s: float = Field(0.0, ge=0, le=3600)
    allow_remote: bool = False
    app_name: str = Field("adrel", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    replicas: int = Field(1, ge=1, le=1024)
    num_cpus_per_replica: float = Field(1.0, ge=0, le=1024)
    intra_op_threads: int | None = Field(None, ge=1, le=1024)
    ort_spin_wait: bool = False
    solo_session: bool = True
    providers: Literal["auto", "cpu", "cuda"] = "auto"
    max_ongoing_requests: int | None = Field(None, ge=1, le=100_000)
    reload_interval_s: float = Field(0.0, ge=0, le=86_400)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, le=3600)
    access_log: bool = False
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("give an export directory or a models:/ URI")
        return v.strip()

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("list at least one task, or leave unset for every task")
        for name in v:
            check_task_name(name)
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate task names in {v}")
        return list(v)

    @field_validator("reload_interval_s")
    @classmethod
    def _check_interval(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError("use 0 (off) or at least 1 second")
        return v

    @model_validator(mode="after")
    def _check_cross(self) -> ServeConfig:
        errors = []
        if not self.allow_remote and not is_loopback(self.host):
            errors.append(
                f"host {self.host!r} is not a loopback address: the service has no "
                "authentication, so serving beyond this machine needs allow_remote "
                "(--allow-remote)"
            )
        need = self.batching.max_batch_size * self.batching.max_concurrent_batches
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < need:
            errors.append(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                f"max_batch_size * max_concurrent_batches ({need}), or batches never fill"
            )
        if self.ingress == "proxy" and self.proxy_port not in (None, self.port):
            errors.append(
                f"proxy_port ({self.proxy_port}) is for ingress 'direct'; with ingress "
                f"'proxy' Serve's proxy listens on port ({self.port})"
            )
        if self.ingress == "direct":
            ports = self.replica_ports
            default_proxy = self.proxy_port is None  # then the proxy takes ports.stop
            if ports.stop - 1 + default_proxy > 65535:
                errors.append(
                    f"port {self.port}: {self.replicas} replica(s) need ports {ports.start}-"
                    f"{ports.stop - 1}"
                    + (f" and the proxy {ports.stop}" if default_proxy else "")
                    + "; pick a lower port"
                )
            elif self.proxy_port in ports:
                errors.append(
                    f"proxy_port {self.proxy_port} is one of the replica ports "
                    f"{ports.start}-{ports.stop - 1}"
                )
        if errors:
            raise ValueError("\n".join(errors))
        return self

    @property
    def replica_ports(self) -> range:
        """Direct ingress: the ports replicas may take (one each, as many spare for restarts)."""
        return (
            range(self.port, self.port + 2 * self.replicas)
            if self.ingress == "direct"
            else range(0)
        )

    @property
    def serve_proxy_port(self) -> int:
        """Where Serve's own HTTP proxy listens."""
        if self.ingress == "proxy":
            return self.port
        return self.proxy_port if self.proxy_port is not None else self.replica_ports.stop

    def ray_env(self) -> dict[str, str]:
        """Environment the Ray cluster's Serve processes need for this ingress (read when they
        start: set it before a local cluster starts; a running cluster keeps its own).

        Also gives Serve's proxy 30 s instead of 5 to report ready: on a busy host its start
        takes longer, and after three missed checks Serve kills it and serve.start fails.
        """
        common = {
            "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
            # Run the app's request handlers on the replica's own event loop instead of a
            # second loop in another thread: two thread hand-offs less per request. Safe here
            # because the handlers never block (model calls and loading run in threads).
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        }
        if self.ingress == "proxy":
            return {**common, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
        return {
            **common,
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(self.replica_ports.start),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(self.replica_ports.stop),
            # The app drains itself (serving.app.drain) before Serve stops it; Serve's own
            # window on top would double the wait.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        }

    def ort_threads(self, cores: int | None = None) -> int:
        """ONNX Runtime intra-op threads per model call: intra_op_threads as set, else the
        cores this process may run on (`cores`, default: its CPU affinity) split evenly
        between the model slots, at least one each."""
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        cores = cores if cores is not None else _cores()
        return max(1, cores // self.batching.max_concurrent_batches)

    def ort_solo_threads(self, cores: int | None = None) -> int | None:
        """Threads of the solo session (see solo_session): the cores a call running alone
        could use, up to two, where `ort_threads` gives a call fewer; else None (no second
        session: threads set explicitly, one slot, or enough threads per call already)."""
        if not self.solo_session or self.intra_op_threads is not None:
            return None
        cores = cores if cores is not None else _cores()
        solo = min(cores, 2)
        return solo if self.ort_threads(cores) < solo else None

    @property
    def ongoing_requests(self) -> int:
        """max_ongoing_requests as set, else twice what one round of batches holds."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        need = self.batching.max_batch_size * self.batching.max_concurrent_batches
        return max(2 * need, 8)

    @classmethod
    def build(cls, **fields) -> ServeConfig:
        """Validate `fields` (sections as dicts); ServeConfigError lists every error."""
        try:
            return cls.model_validate(fields)
        except ValidationError as e:
            raise ServeConfigError(format_validation_error(e)) from None


def is_loopback(host: str) -> bool:
    """True for loopback addresses and names (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)
