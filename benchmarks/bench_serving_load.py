"""Closed-loop HTTP load on the scoring service: latency and throughput, batched vs unbatched.

One item per request, on 127.0.0.1. Two apps run side by side on one Serve instance: one with
dynamic batching (max batch size --batch-size, wait --batch-wait-ms) and one without (max batch
size 1). Both run as `adrel serve` runs them by default, with direct ingress: each replica
answers HTTP on a port of its own. Phases are interleaved round-robin (--rounds) so both share
the machine's conditions, and each phase is bounded by a request count and a time limit. The
bare Scorer's latency for one item (same texts, the replicas' ORT settings, no HTTP) is
measured in the same run: the difference is the service's own overhead. So is the bare
Scorer's throughput in full batches, the most any load could get from the model on this
machine (`c16_model_bound_ms`: the mean latency of 16 closed-loop clients at that rate).
Side by side in the same run: the
batched app at concurrency 1 through Serve's HTTP proxy (`p50_ms_c1_proxy`, the
`--ingress proxy` path), and a third app that only parses the body and returns a constant,
which gives Ray Serve's own floor on the machine, direct (`serve_floor_p50_ms`) and through
the proxy (`serve_floor_proxy_p50_ms`). Each phase also reports where a request's time went
(the mean latency, the mean time inside the handler, which holds the wait for a model slot, and
the mean model call) and the load generator's own CPU per request. Last line: one JSON object.

    python benchmarks/bench_serving_load.py [--model DIR|URI] [--requests 1000] [--rounds 3]

At c16 the service answers ~200 requests a second on the 2-core development machine: 1000
requests a phase keep each c16 phase ~5 s long, so its p99 is the 10th-slowest answer, not the
2nd, and a phase is not one second of the machine's moods.

Without --model, a MiniLM-L6 checkpoint with non-zero adapters is built and exported to a
temporary directory first (tens of seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.client
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

QUERY_WORDS = [
    "cheap",
    "running",
    "shoes",
    "women",
    "waterproof",
    "hiking",
    "boots",
    "wireless",
    "earbuds",
    "noise",
    "cancelling",
    "laptop",
    "bag",
    "leather",
    "office",
    "chair",
    "ergonomic",
    "coffee",
    "grinder",
    "burr",
    "kids",
    "bike",
    "helmet",
    "garden",
    "hose",
    "expandable",
    "yoga",
    "mat",
    "thick",
    "phone",
    "case",
    "slim",
    "winter",
    "jacket",
    "men",
    "standing",
    "desk",
]
TITLE_WORDS = [
    "official",
    "store",
    "free",
    "shipping",
    "sale",
    "new",
    "collection",
    "best",
    "price",
    "limited",
    "offer",
    "premium",
    "quality",
    "lightweight",
    "durable",
    "comfortable",
    "classic",
    "modern",
    "design",
    "fast",
    "delivery",
    "top",
    "rated",
]


def make_items(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Varied query–ad pairs (a few to ~40 tokens), like the ad server would send."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        q = " ".join(rng.choices(QUERY_WORDS, k=rng.randint(2, 6)))
        t = " ".join(rng.choices(QUERY_WORDS + TITLE_WORDS, k=rng.randint(4, 10)))
        d = " ".join(rng.choices(TITLE_WORDS + QUERY_WORDS, k=rng.randint(0, 16)))
        items.append({"query": q, "ad_title": t, "ad_description": d or None})
    return items


def build_export(out: Path) -> Path:
    """A MiniLM-L6 checkpoint with non-zero adapters and heads, exported for serving."""
    import torch

    from features.tasks import TaskRegistry
    from models.checkpoint import build_model, save_checkpoint
    from models.config import AdapterConfig
    from models.encoder import DEFAULT_ENCODER, resolve_encoder
    from pipeline.export import export_checkpoint

    torch.manual_seed(0)
    tasks = TaskRegistry(["search", "shopping"])
    model = build_model(str(resolve_encoder(DEFAULT_ENCODER)), AdapterConfig(num_tasks=2), tasks)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(torch.randn_like(p) * 0.02)
    ckpt = save_checkpoint(model, out / "ckpt", max_length=64)
    return export_checkpoint(ckpt, out / "export").out_dir


def closed_loop(
    port: int,
    path: str,
    bodies: list[bytes],
    concurrency: int,
    requests: int,
    limit_s: float,
    client: str = "async",
) -> dict[str, float]:
    """`concurrency` clients each send the next request when the last answer arrived.

    The clients are coroutines on one event loop in a thread of their own, each on its own
    keep-alive connection, speaking just enough HTTP/1.1 for this: the load generator shares the
    machine with the service, so it should cost as little CPU as it can (`client_cpu_ms` per
    request is reported; client "threads" runs one http.client thread per client instead).
    """
    if client == "threads":
        return _closed_loop_threads(port, path, bodies, concurrency, requests, limit_s)
    out: dict[str, float] = {}
    t = threading.Thread(
        target=lambda: out.update(
            asyncio.run(_closed_loop_async(port, path, bodies, concurrency, requests, limit_s))
        )
    )
    t.start()
    t.join()
    return out


async def _closed_loop_async(
    port: int, path: str, bodies: list[bytes], concurrency: int, requests: int, limit_s: float
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + limit_s
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"

    async def client(k: int) -> None:
        nonlocal sent, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        try:
            while sent < requests and time.perf_counter() <= deadline:
                sent += 1
                body = bodies[i % len(bodies)]
                i += concurrency
                t0 = time.perf_counter()
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                status, length = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                await reader.readexactly(length)
                dt = time.perf_counter() - t0
                if status == 200:
                    latencies.append(dt)
                else:
                    errors += 1
        finally:
            writer.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {**summarize(latencies, wall, errors), "client_cpu_ms": cpu * 1e3 / max(1, sent)}


def _parse_head(head: bytes) -> tuple[int, int]:
    """(status, Content-Length) of a response head; the service always sends a length."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return status, int(value)
    raise RuntimeError(f"response without Content-Length: {head[:200]!r}")


def _closed_loop_threads(
    port: int, path: str, bodies: list[bytes], concurrency: int, requests: int, limit_s: float
) -> dict[str, float]:
    """The same load from one http.client thread per client (--client threads)."""
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    sent = [0]
    deadline = time.perf_counter() + limit_s

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = k
        while True:
            with lock:
                if sent[0] >= requests or time.perf_counter() > deadline:
                    break
                sent[0] += 1
            body = bodies[i % len(bodies)]
            i += concurrency
            t0 = time.perf_counter()
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            dt = time.perf_counter() - t0
            with lock:
                if resp.status == 200:
                    latencies.append(dt)
                else:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu_ms = (time.process_time() - cpu0) * 1e3 / max(1, sent[0])
    return {**summarize(latencies, wall, errors[0]), "client_cpu_ms": cpu_ms}


def summarize(latencies: list[float], wall: float, errors: int = 0) -> dict[str, float]:
    lat = sorted(x * 1000 for x in latencies)
    if not lat:
        nan = float("nan")
        return {"n": 0, "errors": errors, "p50_ms": nan, "mean_ms": nan, "p99_ms": nan, "rps": 0}
    return {
        "n": len(lat),
        "errors": errors,
        "p50_ms": statistics.median(lat),
        "mean_ms": statistics.fmean(lat),
        "p99_ms": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
        "rps": len(lat) / wall,
    }


# The per-phase split of a request's time in the replica, as the JSON line names it.
SPLIT = ("handler_ms", "batcher_ms", "queue_ms", "model_call_ms", "own_call_ms", "waiting_at_take")


def mean_between(before: dict, after: dict, total: str, count: str) -> float:
    """Mean of a /v1/stats running total over what happened between two snapshots."""
    return (after[total] - before[total]) / max(1, after[count] - before[count])


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def echo_app():
    """Ray Serve's own floor: a FastAPI app that parses the same body and returns one score."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(
        name="echo",
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False},
    )
    @serve.ingress(api)
    class Echo:
        @api.post("/v1/score")
        async def score(self, body: dict) -> dict:
            return {"task": body.get("task"), "model_version": "echo", "scores": [0.5]}

    return Echo.bind()


def replica_ports(candidates: range, apps: list[str], wait_s: float = 60.0) -> dict[str, int]:
    """Which direct-ingress port each app's replica took (Serve answers GET /-/routes there)."""
    found: dict[str, int] = {}
    deadline = time.monotonic() + wait_s
    while set(found) != set(apps):
        for p in candidates:
            try:
                routes = get_json(p, "/-/routes")
            except (OSError, ValueError):
                continue
            if not isinstance(routes, dict):  # still starting: a message, not the routes
                continue
            found.update({app: p for app in routes.values() if app in apps})
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas found on {found}, none for {set(apps) - set(found)}")
        time.sleep(0.25)
    return found


def bare_scorer(
    scorer, items: list[dict], n: int, rows: int = 1, callers: int = 1, solo: bool = False
) -> dict:
    """The Scorer alone in this process (built with the ORT settings the replicas use):
    `callers` threads (a replica's model slots) share n calls of `rows` items. One caller,
    one row: the floor under the service's latency (on the solo session, as a replica runs a
    call alone). Several callers with full batches: the most the model gives on this machine
    (items/s)."""
    from concurrent.futures import ThreadPoolExecutor

    def call(i: int) -> float:
        its = [items[(i * rows + k) % len(items)] for k in range(rows)]
        t0 = time.perf_counter()
        scorer.score(
            [x["query"] for x in its],
            [x["ad_title"] for x in its],
            [x["ad_description"] for x in its],
            solo=solo,
        )
        return time.perf_counter() - t0

    for i in range(5):
        call(i)
    t_start = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        lat = list(pool.map(call, range(n)))
    wall = time.perf_counter() - t_start
    return {**summarize(lat, wall), "items_per_s": n * rows / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="export directory or models:/ URI (default: build MiniLM)")
    ap.add_argument("--task", default=None, help="task to score (default: the first)")
    ap.add_argument("--requests", type=int, default=1000, help="requests per phase")
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds per phase at most")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all phases")
    ap.add_argument("--batch-size", type=int, default=16, help="max batch size when batched")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0, help="batch wait (batched app)")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (replica)")
    ap.add_argument(
        "--spin-wait",
        choices=("on", "off"),
        default=None,
        help="ORT thread spinning in the replicas (default: the service's default)",
    )
    ap.add_argument(
        "--solo-session",
        choices=("on", "off"),
        default=None,
        help="a second ORT session for calls that run alone (default: the service's default)",
    )
    ap.add_argument(
        "--concurrent-batches",
        type=int,
        default=None,
        help="model calls a replica runs at once (default: the service's default)",
    )
    ap.add_argument(
        "--client",
        choices=("async", "threads"),
        default="async",
        help="load generator: coroutines on one thread (default) or a thread per client",
    )
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    args = ap.parse_args()

    from jobs.runtime import ensure_ray, free_loopback_port, set_env_defaults, shutdown_ray

    load = functools.partial(closed_loop, client=args.client)

    set_env_defaults()
    tmp = tempfile.TemporaryDirectory(prefix="adrel-bench-serve-")
    model = args.model
    if model is None:
        t0 = time.perf_counter()
        model = str(build_export(Path(tmp.name)))
        print(f"built MiniLM-L6 export in {time.perf_counter() - t0:.1f} s: {model}")

    from ray import serve

    from serving.app import build_app
    from serving.config import ServeConfig

    # Direct ingress: each app's replica answers on a port of its own from [base, base + 6)
    # (3 apps, one replica each, as many spare); Serve's proxy on base + 6 reaches them all.
    base = free_loopback_port(7)
    ingress = ServeConfig.build(model=model, port=base, replicas=3)
    ensure_ray(num_cpus=args.num_cpus, env=ingress.ray_env())
    proxy = ingress.serve_proxy_port
    serve.start(
        http_options={"host": "127.0.0.1", "port": proxy},
        logging_config={"enable_access_log": False},
    )
    common = {
        "model": model,
        "intra_op_threads": args.threads,
        **({"ort_spin_wait": args.spin_wait == "on"} if args.spin_wait else {}),
        **({"solo_session": args.solo_session == "on"} if args.solo_session else {}),
        "num_cpus_per_replica": 0,
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
    }
    slot_option = {} if args.concurrent_batches is None else {"max_concurrent_batches": args.concurrent_batches}  # fmt: skip
    apps = {
        "batched": {
            "max_batch_size": args.batch_size,
            "batch_wait_ms": args.batch_wait_ms,
            **slot_option,
        },
        "unbatched": {"max_batch_size": 1, "batch_wait_ms": 0.0, **slot_option},
    }
    cfgs = {
        name: ServeConfig.build(**common, app_name=name, batching=batching)
        for name, batching in apps.items()
    }
    for name, cfg in cfgs.items():
        serve.run(build_app(cfg), name=name, route_prefix=f"/{name}", blocking=False)
    serve.run(echo_app(), name="echo", route_prefix="/echo", blocking=False)
    # The bare Scorer runs as the batched app's replica does.
    from serving.scorer import load_scorers

    ref = cfgs["batched"]
    threads, slots = ref.ort_threads(), ref.batching.max_concurrent_batches
    spin = ref.ort_spin_wait
    ports = replica_ports(ingress.replica_ports, ["batched", "unbatched", "echo"])
    print(f"direct ingress ports {ports}; Serve's proxy on {proxy}", flush=True)
    port = ports["batched"]

    info = get_json(port, "/batched/v1/tasks")
    task = args.task or sorted(info["tasks"])[0]
    solo_threads = ref.ort_solo_threads()
    bare_model = load_scorers(
        model, tasks=[task], intra_op_threads=threads, spin_wait=spin, solo_threads=solo_threads
    )[task]
    items = make_items(512)
    bodies = [json.dumps({"task": task, "items": [it]}).encode() for it in items]

    for name in apps:  # warm up both apps (first batches, thread pools, allocations)
        load(ports[name], f"/{name}/v1/score", bodies, 4, 40, 10.0)
    load(proxy, "/batched/v1/score", bodies, 4, 40, 10.0)

    phases = [(name, c) for c in (1, 16) for name in apps]
    runs: dict[tuple[str, int], list[dict]] = {p: [] for p in phases}
    bare_runs = []
    capacity_runs = []
    single_runs = []  # the bare Scorer from as many callers, one item per call
    floor_runs = []
    proxy_runs = []
    proxy_floor_runs = []
    c16_batches = c16_items = 0
    for r in range(args.rounds):
        for name, c in phases:
            at = ports[name]
            before = get_json(at, f"/{name}/v1/stats")
            res = load(at, f"/{name}/v1/score", bodies, c, args.requests, args.time_limit)
            after = get_json(at, f"/{name}/v1/stats")
            res["mean_batch"] = mean_between(before, after, "items", "batches")
            # Where a request's time went: inside the handler (batch queue + model call) vs
            # outside it (HTTP, Serve's request path, the event loop's queue, the client).
            res["handler_ms"] = mean_between(before, after, "handler_ms_total", "handled")
            res["model_call_ms"] = mean_between(before, after, "model_call_ms_total", "batches")
            # The queue in front of the model slots: a chunk's wait there, and the items
            # waiting when a call was taken (what `_share` split).
            res["queue_ms"] = mean_between(before, after, "queue_ms_total", "queued_chunks")
            # The call a request's chunk rode in (a long call holds more of them than the
            # mean over calls says).
            res["own_call_ms"] = mean_between(before, after, "chunk_call_ms_total", "requests")
            res["batcher_ms"] = mean_between(before, after, "batcher_ms_total", "batcher_chunks")
            res["waiting_at_take"] = mean_between(
                before, after, "waiting_items_at_take_total", "batches"
            )
            if (name, c) == ("batched", 16):
                c16_batches += after["batches"] - before["batches"]
                c16_items += after["items"] - before["items"]
            runs[(name, c)].append(res)
            print(
                f"round {r} {name:9s} c={c:2d}: n={res['n']} p50={res['p50_ms']:.2f} ms "
                f"p99={res['p99_ms']:.2f} ms rps={res['rps']:.1f} "
                f"mean batch={res['mean_batch']:.2f} errors={res['errors']} "
                f"client cpu={res['client_cpu_ms']:.2f} ms/req | mean latency "
                f"{res['mean_ms']:.2f} ms, in the handler {res['handler_ms']:.2f} ms, "
                f"model call {res['model_call_ms']:.2f} ms (a chunk's own "
                f"{res['own_call_ms']:.2f} ms), in Serve's batcher "
                f"{res['batcher_ms']:.2f} ms, queued for a slot "
                f"{res['queue_ms']:.2f} ms ({res['waiting_at_take']:.1f} items waiting at a take)",
                flush=True,
            )
        via = load(proxy, "/batched/v1/score", bodies, 1, args.requests, args.time_limit)
        proxy_runs.append(via)
        print(f"round {r} batched c= 1 through Serve's proxy: p50={via['p50_ms']:.2f} ms")
        for at, runs_of, what in [(ports["echo"], floor_runs, "direct"), (proxy, proxy_floor_runs, "proxy")]:  # fmt: skip
            floor = load(at, "/echo/v1/score", bodies, 1, args.requests, args.time_limit)
            runs_of.append(floor)
            print(f"round {r} serve floor {what:6s}: p50={floor['p50_ms']:.2f} ms (a no-op app)")
        bare = bare_scorer(bare_model, items, args.requests, solo=True)
        bare_runs.append(bare)
        full = bare_scorer(bare_model, items, 32, args.batch_size, slots)
        capacity_runs.append(full["items_per_s"])
        single = bare_scorer(bare_model, items, 64, 1, slots)
        single_runs.append(single["items_per_s"])
        print(
            f"round {r} bare scorer     : p50={bare['p50_ms']:.2f} ms p99={bare['p99_ms']:.2f} ms;"
            f" from {slots} caller(s), {args.batch_size} items per call:"
            f" {full['items_per_s']:.0f} items/s, 1 item per call: {single['items_per_s']:.0f}"
        )

    stats = get_json(port, "/batched/v1/stats")
    serve.shutdown()
    shutdown_ray()

    def med(name: str, c: int, key: str) -> float:
        return statistics.median(x[key] for x in runs[(name, c)])

    bare_p50 = statistics.median(x["p50_ms"] for x in bare_runs)
    out = {
        "p50_ms_c1": round(med("batched", 1, "p50_ms"), 2),
        "p99_ms_c1": round(med("batched", 1, "p99_ms"), 2),
        "p50_ms_c1_unbatched": round(med("unbatched", 1, "p50_ms"), 2),
        "p50_ms_c16_batched": round(med("batched", 16, "p50_ms"), 2),
        "p99_ms_c16_batched": round(med("batched", 16, "p99_ms"), 2),
        "p99_ms_c16_unbatched": round(med("unbatched", 16, "p99_ms"), 2),
        "rps_c1": round(med("batched", 1, "rps"), 1),
        "rps_c16_batched": round(med("batched", 16, "rps"), 1),
        "rps_c16_unbatched": round(med("unbatched", 16, "rps"), 1),
        "batching_gain": round(med("batched", 16, "rps") / med("unbatched", 16, "rps"), 2),
        "bare_scorer_p50_ms": round(bare_p50, 2),
        "overhead_ms_c1": round(med("batched", 1, "p50_ms") - bare_p50, 2),
        # The model alone, flat out in full batches, in this process: what 16 closed-loop
        # clients could get at best, and the mean latency that implies (16 / items/s).
        "bare_scorer_items_per_s": round(statistics.median(capacity_runs), 1),
        "c16_model_bound_ms": round(16_000 / statistics.median(capacity_runs), 1),
        # What batching can gain in the model alone: full batches vs one item per call, from as
        # many callers as model slots (the ceiling of batching_gain, less what Serve adds).
        "model_batching_gain_bound": round(
            statistics.median(capacity_runs) / statistics.median(single_runs), 2
        ),
        "ingress": "direct",
        "p50_ms_c1_proxy": round(statistics.median(x["p50_ms"] for x in proxy_runs), 2),
        "serve_floor_p50_ms": round(statistics.median(x["p50_ms"] for x in floor_runs), 2),
        "serve_floor_proxy_p50_ms": round(
            statistics.median(x["p50_ms"] for x in proxy_floor_runs), 2
        ),
        "client": args.client,
        "client_cpu_ms_per_request_c16": round(med("batched", 16, "client_cpu_ms"), 3),
        "mean_batch_items_c16": round(c16_items / max(1, c16_batches), 2),
        # Where a c16 request's time goes in the batched replica (medians over the rounds).
        **{f"{key}_c16_batched": round(med("batched", 16, key), 2) for key in SPLIT},
        "max_batch_items": stats["max_batch_items"],
        "errors": sum(x["errors"] for rs in runs.values() for x in rs),
        "requests_per_phase": args.requests,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "intra_op_threads": threads,
        "solo_threads": solo_threads,
        "max_concurrent_batches": slots,
        "ort_spin_wait": args.spin_wait,
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    tmp.cleanup()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
