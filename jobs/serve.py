"""`adrel serve`: the online scoring service (Ray Serve + FastAPI) until SIGTERM/SIGINT.

    adrel serve --model URI [--host 127.0.0.1] [--port 8000] [--tasks a b] [--replicas N]
                [--max-batch-size N] [--batch-wait-ms X] [--ingress direct|proxy] [--allow-remote]

Binds 127.0.0.1 unless told otherwise; a non-loopback --host also needs --allow-remote (the
service has no authentication). With the default direct ingress every replica answers HTTP
itself, replica k on --port + k, and Serve's proxy (which spreads requests over the replicas)
listens on --proxy-port; with --ingress proxy, Serve's proxy listens on --port. On SIGTERM or
SIGINT the replicas drain (GET /healthz answers 503 at once; after --drain-seconds new requests
get 503 with `Connection: close`; the ones admitted finish), then the app is deleted and Serve
and Ray are shut down when this command started them.
Exit codes: 0 clean shutdown, 2 bad input (configuration, model source, port in use),
1 Ray or the service failed to start.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from jobs.runtime import cpu_count_arg

EPILOG = """\
model URIs: an export directory (index.json, or one task's directory),
models:/<prefix>-<task>@<alias>, models:/adrel@champion (every adrel-<task> at that alias).

endpoints: POST /v1/score, GET /v1/tasks, GET /v1/stats, GET /healthz, POST /v1/reload,
GET /docs (OpenAPI).

ingress: "direct" (default): each replica listens itself on --port, --port+1, ... (as many
spare ports again for restarts), no proxy hop: the low-latency path. Serve's proxy still
runs on --proxy-port (default: right after the replica ports). "proxy": Serve's proxy on
--port forwards every request to a replica (one address for any number of replicas).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="online scoring service on Ray Serve (HTTP, dynamic batching, hot reload)",
        description="Serve the merged per-task ONNX models over HTTP until SIGTERM/SIGINT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="export directory or models:/ URI")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host (the service has no authentication)",
    )
    p.add_argument(
        "--ingress",
        choices=("direct", "proxy"),
        default="direct",
        help="direct: replicas answer HTTP themselves (default); proxy: through Serve's proxy",
    )
    p.add_argument(
        "--proxy-port",
        type=int,
        help="direct ingress: port of Serve's proxy (default: after the replica ports)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=0.0,
        help="on SIGTERM, replicas keep scoring this long while GET /healthz answers 503, so "
        "that a load balancer in front can take them out first; then new requests get 503 "
        "(default 0)",
    )
    p.add_argument("--tasks", nargs="+", help="serve only these tasks (default: all)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--max-batch-size", type=int, default=16, help="items per model call; 1: off")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="wait for more requests before a model call (default 0: requests that arrive "
        "while the model is busy are batched anyway)",
    )
    p.add_argument(
        "--max-concurrent-batches",
        type=int,
        default=2,
        help="model calls a replica runs at once (default 2; the cores are split between them)",
    )
    p.add_argument(
        "--max-ongoing-requests",
        type=int,
        help="requests one replica takes at once (default 2 x max batch size)",
    )
    p.add_argument("--max-items", type=int, default=256, help="items per request (413 above)")
    p.add_argument(
        "--max-text-chars", type=int, default=4096, help="characters per text field (413 above)"
    )
    p.add_argument(
        "--reload-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="check the model source this often and swap in a new version (0: off)",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        help="ONNX Runtime threads per model call (default: the cores / --max-concurrent-batches)",
    )
    p.add_argument(
        "--no-solo-session",
        dest="solo_session",
        action="store_false",
        help="no second ORT session per task for calls that run alone (saves a copy of the "
        "weights in memory; a lone call then gets one model slot's threads)",
    )
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: env, else workdir)")
    p.add_argument("--workdir", default=None, help="work directory of the default MLflow store")
    p.add_argument("--ray-address", help="connect to this Ray cluster (default: start one)")
    p.add_argument("--num-cpus", type=cpu_count_arg, help="CPUs of the local Ray cluster")
    p.set_defaults(func=run)


# ServeConfig's fields as this command's options, for error messages.
FLAGS = {
    "drain_s": "--drain-seconds",
    "reload_interval_s": "--reload-interval",
    "batching.max_batch_size": "--max-batch-size",
    "batching.batch_wait_ms": "--batch-wait-ms",
    "batching.max_concurrent_batches": "--max-concurrent-batches",
    "limits.max_items": "--max-items",
    "limits.max_text_chars": "--max-text-chars",
    **{f: "--" + f.replace("_", "-") for f in (
        "model", "tasks", "host", "port", "ingress", "proxy_port", "replicas",
        "num_cpus_per_replica", "intra_op_threads", "max_ongoing_requests",
    )},
}  # fmt: skip


def build_config(args: argparse.Namespace):
    """The validated ServeConfig for the parsed arguments (every bad value reported at once,
    each by its option: `--drain-seconds (drain_s): ...`)."""
    from serving.config import ServeConfigError

    try:
        return _build_config(args)
    except ServeConfigError as e:
        raise ServeConfigError([_name_flag(line) for line in e.errors]) from None


def _name_flag(error: str) -> str:
    field, sep, rest = error.partition(":")
    flag = FLAGS.get(field.strip())
    return f"{flag} ({field}){sep}{rest}" if sep and flag else error


def _build_config(args: argparse.Namespace):
    from jobs.runtime import DEFAULT_WORKDIR, tracking_uri
    from serving.config import ServeConfig

    uses_mlflow = args.model.startswith(("models:/", "runs:/"))
    return ServeConfig.build(
        model=args.model,
        tasks=args.tasks,
        tracking_uri=tracking_uri(args.workdir or DEFAULT_WORKDIR, args.tracking_uri)
        if uses_mlflow
        else None,
        host=args.host,
        port=args.port,
        ingress=args.ingress,
        proxy_port=args.proxy_port,
        drain_s=args.drain_seconds,
        allow_remote=args.allow_remote,
        replicas=args.replicas,
        num_cpus_per_replica=args.num_cpus_per_replica,
        intra_op_threads=args.intra_op_threads,
        solo_session=args.solo_session,
        max_ongoing_requests=args.max_ongoing_requests,
        reload_interval_s=args.reload_interval,
        access_log=args.access_log,
        batching={
            "max_batch_size": args.max_batch_size,
            "batch_wait_ms": args.batch_wait_ms,
            "max_concurrent_batches": args.max_concurrent_batches,
        },
        limits={"max_items": args.max_items, "max_text_chars": args.max_text_chars},
    )


def run(args: argparse.Namespace) -> int:
    from jobs.cli import UserError
    from jobs.runtime import ensure_ray, shutdown_ray

    cfg = build_config(args)  # ServeConfigError (a ValueError) is printed by the CLI
    from serving.app import check_source, drain, remove_control, start

    try:
        check_source(cfg)  # before Ray starts: a wrong path or alias fails in a second
    except ValueError as e:
        raise UserError(str(e)) from None
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is None:  # our own cluster: the replicas or the proxy will bind these
        for port in {cfg.port, cfg.serve_proxy_port}:
            check_port_free(cfg.host, port)

    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    # ensure_ray keeps the SIGTERM handler across ray.init (which installs one that aborts).
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in signals}
    connected = False
    try:
        try:
            connected = ensure_ray(address=address, num_cpus=args.num_cpus, env=cfg.ray_env())
        except Exception as e:  # e.g. a raylet that did not come up
            raise UserError(f"Ray did not start: {e}", exit_code=1) from None
        from ray import serve

        try:
            ends = start(cfg)
        except Exception as e:  # Serve's own errors included: report, exit 1, shut down
            raise UserError(f"the service failed to start: {e}", exit_code=1) from None
        tasks = ", ".join(cfg.tasks) if cfg.tasks else "every task of the source"
        url = ends.url
        print(f"adrel serve: {tasks} from {cfg.model} at {url} (docs: {url}/docs)", flush=True)
        if cfg.ingress == "direct":
            print(
                f"adrel serve: direct ingress: replicas at {', '.join(ends.replica_urls)}; "
                f"Serve's proxy (over every replica) at {ends.proxy_url}",
                flush=True,
            )
        while not stop.wait(0.5):
            pass
        print("adrel serve: shutting down (in-flight requests finish first)", flush=True)
        # Replicas: /healthz 503 now, new requests 503 after --drain-seconds; returns once
        # every replica has answered what it admitted (Serve's proxy included, which
        # stopping cuts off mid-answer).
        drained = drain(cfg)
        print(f"adrel serve: {drained} of {cfg.replicas} replica(s) drained", flush=True)
        if address is None:
            serve.shutdown()
        else:  # a shared cluster: remove only this app
            serve.delete(cfg.app_name)
            remove_control(cfg.app_name)
    finally:
        if connected:
            shutdown_ray()  # stops our own cluster; only disconnects from a shared one
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("adrel serve: stopped", flush=True)
    return 0


def check_port_free(host: str, port: int) -> None:
    """Refuse early (exit 2) when something already listens on host:port."""
    from jobs.cli import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


if __name__ == "__main__":
    from jobs.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
