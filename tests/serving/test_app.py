"""The scoring service on a real local Ray Serve, over HTTP on loopback.

One app for the module, serving `models:/adrel@champion` from a real MLflow registry (sqlite in
tmp): adrel-search and adrel-shopping v1, exported from a tiny 2-task checkpoint with non-zero
adapters, and adrel-search v2 (the same graph with its head's bias moved: a different model with
different scores). Scores are compared with the bare Scorer of the same registered version.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from jobs.runtime import free_loopback_port
from tests.serving.helpers import derive_export

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TASKS = ["search", "shopping"]
MAX_BATCH = 8
LIMITS = {"max_items": 40, "max_text_chars": 300, "max_body_bytes": 64 * 1024}


def items(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = [
        "red",
        "running",
        "shoes",
        "cheap",
        "waterproof",
        "boots",
        "kids",
        "bike",
        "helmet",
        "sale",
        "store",
        "new",
    ]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=int(rng.integers(1, 5))))
        t = " ".join(rng.choice(words, size=int(rng.integers(2, 9))))
        d = " ".join(rng.choice(words, size=int(rng.integers(0, 12)))) or None
        out.append({"query": q, "ad_title": t, "ad_description": d if i % 3 else None})
    return out


def reference(scorer, rows: list[dict]) -> np.ndarray:
    return scorer.score(
        [r["query"] for r in rows],
        [r["ad_title"] for r in rows],
        [r["ad_description"] for r in rows],
    )


def local_service(export_dir, max_batch_size: int, slots: int, **config):
    """A ScoringService in this process (no Serve) over export_dir, batch wait 0, and the
    search task's Scorer: for driving the model slots by hand."""
    from serving.app import ScoringService, load_models
    from serving.config import ServeConfig

    batching = {"max_batch_size": max_batch_size, "max_concurrent_batches": slots}
    cfg = ServeConfig.build(
        model=str(export_dir), batching={**batching, "batch_wait_ms": 0}, **config
    )
    service = ScoringService(cfg, load_models(cfg))
    return service, service.models.scorers["search"]


def row_chunk(scorer, row: dict):
    """One request's single row as a batch element."""
    from serving.app import Chunk

    return Chunk(scorer, [row["query"]], [row["ad_title"]], [row["ad_description"]])


def test_config_reports_every_error_and_keeps_batches_fillable():
    from serving.config import ServeConfig, ServeConfigError, is_loopback

    with pytest.raises(ServeConfigError) as e:
        ServeConfig.build(
            model=" ",
            port=70000,
            tasks=["ok", "a/b"],
            batching={"max_batch_size": 0, "batch_wait_ms": -1},
            limits={"max_items": 0},
            reload_interval_s=0.5,
        )
    text = str(e.value)
    for field in (
        "model",
        "port",
        "tasks",
        "max_batch_size",
        "batch_wait_ms",
        "max_items",
        "reload_interval_s",
    ):
        assert field in text, (field, text)
    with pytest.raises(ServeConfigError, match="max_ongoing_requests"):
        ServeConfig.build(model="m", batching={"max_batch_size": 32}, max_ongoing_requests=8)
    with pytest.raises(ServeConfigError, match="allow_remote"):
        ServeConfig.build(model="m", host="0.0.0.0")
    cfg = ServeConfig.build(
        model="m", host="0.0.0.0", allow_remote=True, batching={"max_batch_size": 24}
    )
    assert cfg.ongoing_requests >= 24 * cfg.batching.max_concurrent_batches
    assert cfg.ort_spin_wait is False  # the replica shares its cores with Serve's proxy
    hosts = {"127.0.0.1": True, "127.1.2.3": True, "::1": True, "localhost": True}
    hosts.update({"10.0.0.1": False, "::": False, "0.0.0.0": False, "example.com": False})
    assert {h: is_loopback(h) for h in hosts} == hosts


def test_ort_threads_split_the_cores_between_model_slots():
    from serving.config import ServeConfig

    cfg = ServeConfig.build(model="m")
    assert cfg.batching.max_concurrent_batches == 2
    assert [cfg.ort_threads(cores=c) for c in (1, 2, 3, 16)] == [1, 1, 1, 8]
    one_slot = ServeConfig.build(model="m", batching={"max_concurrent_batches": 1})
    assert one_slot.ort_threads(cores=2) == 2
    assert ServeConfig.build(model="m", intra_op_threads=3).ort_threads(cores=16) == 3
    assert 1 <= cfg.ort_threads() <= (os.cpu_count() or 1)
    # A call that runs alone gets the idle slots' threads (a second session) where the
    # split leaves it one: up to two cores.
    assert [cfg.ort_solo_threads(cores=c) for c in (1, 2, 3, 16)] == [None, 2, 2, None]
    assert one_slot.ort_solo_threads(cores=2) is None
    assert ServeConfig.build(model="m", intra_op_threads=1).ort_solo_threads(cores=2) is None
    assert ServeConfig.build(model="m", solo_session=False).ort_solo_threads(cores=2) is None


def test_ingress_ports_and_the_environment_serve_needs():
    from serving.config import ServeConfig, ServeConfigError

    direct = ServeConfig.build(model="m", port=9000, replicas=3)
    assert direct.ingress == "direct"  # the default: no proxy hop
    assert list(direct.replica_ports) == list(range(9000, 9006))  # 3 replicas + 3 spare
    assert direct.serve_proxy_port == 9006
    env = direct.ray_env()
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("9000", "9006")  # fmt: skip
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) == 0.0
    assert ServeConfig.build(model="m", proxy_port=8500, drain_s=5).serve_proxy_port == 8500
    proxy = ServeConfig.build(model="m", port=9000, ingress="proxy", replicas=3)
    assert (proxy.serve_proxy_port, list(proxy.replica_ports)) == (9000, [])
    assert proxy.ray_env()["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert not any("DIRECT_INGRESS_" in k for k in proxy.ray_env())
    for cfg in (direct, proxy):  # a proxy slow to start on a busy host is not killed at 5 s
        assert float(cfg.ray_env()["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]) >= 30
    for bad, mention in [
        ({"port": 9000, "proxy_port": 9001}, "proxy_port 9001 is one of the replica ports"),
        ({"ingress": "proxy", "proxy_port": 9100}, "proxy_port (9100) is for ingress 'direct'"),
        ({"port": 65534, "replicas": 2}, "port 65534: 2 replica(s) need ports 65534-65537"),
        ({"port": 65534, "replicas": 2, "proxy_port": 9000}, "need ports 65534-65537; pick"),
        ({"ingress": "sideways"}, "ingress"),
        ({"drain_s": -1}, "drain_s"),
    ]:
        with pytest.raises(ServeConfigError) as e:
            ServeConfig.build(model="m", **bad)
        assert mention in str(e.value), (bad, str(e.value))


@pytest.fixture(scope="module")
def export_v1(make_tiny_export):
    """An export of a tiny 2-task checkpoint with non-zero adapters and heads."""
    return make_tiny_export(TASKS, "serve-export")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, export_v1):
    """adrel-search v1, v2 and adrel-shopping v1 in a real registry; champion -> v1."""
    from pipeline.registry import promote, register_export

    tmp = tmp_path_factory.mktemp("serve-registry")
    v2 = derive_export(export_v1, tmp / "export-v2", bias_shift=1.5)
    uri = "sqlite:///" + str((tmp / "mlflow.db").resolve())
    # models:/ downloads read the registry URI from the environment (as the replicas do)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    r1 = register_export(export_v1, tracking_uri=uri)
    r2 = register_export(v2, tracking_uri=uri, tasks=["search"])  # a new search model only
    for t in TASKS:
        promote(t, r1[t].version, reason="test", tracking_uri=uri)
    yield {
        "uri": uri,
        "v1": {t: str(r1[t].version) for t in TASKS},
        "v2": {"search": str(r2["search"].version), "shopping": str(r1["shopping"].version)},
    }
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def test_directory_source_and_a_runtime_without_torch(export_v1):
    """The replica's code path (config, source check, Scorers, API) imports no torch,
    transformers, models/ or mlflow for a directory source."""
    from serving.app import check_source, source_state
    from serving.config import ServeConfig

    cfg = ServeConfig.build(model=str(export_v1))
    versions = source_state(cfg)
    assert set(versions) == set(TASKS)
    # The replica's sessions get the cores split between its model slots.
    from serving.app import load_models

    for scorer in load_models(cfg).scorers.values():
        opts = scorer.session.get_session_options()
        assert opts.intra_op_num_threads == cfg.ort_threads() >= 1
        if cfg.ort_solo_threads() is None:
            assert scorer.solo_session is None
        else:
            solo = scorer.solo_session.get_session_options()
            assert solo.intra_op_num_threads == cfg.ort_solo_threads() == 2
    with pytest.raises(ValueError, match=r"no model for task\(s\) \['nope'\]"):
        check_source(ServeConfig.build(model=str(export_v1), tasks=["search", "nope"]))
    with pytest.raises(ValueError, match="no such directory"):
        check_source(ServeConfig.build(model=str(export_v1 / "missing")))
    empty = export_v1.parent / "empty-source"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=r"holds no exported model \(index.json or meta.json\)"):
        check_source(ServeConfig.build(model=str(empty)))
    code = f"""
import sys
from serving.app import ScoringService, build_api, load_models
from serving.config import ServeConfig
models = load_models(ServeConfig.build(model={str(export_v1)!r}, tasks=["shopping"]))
build_api(ScoringService(models=models, cfg=ServeConfig.build(model="x")))
print(sorted(models.scorers), models.versions()["shopping"])
heavy = ("torch", "transformers", "models", "mlflow")
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == f"['shopping'] {versions['shopping']}"
    assert lines[-1] == "[]"


def set_champion(registry, which: str) -> None:
    from pipeline.registry import promote

    promote("search", registry[which]["search"], reason="test", tracking_uri=registry["uri"])


def scorers(registry, which: str) -> dict:
    """The bare Scorers of the versions `which` names (v2: the new search model)."""
    from serving.scorer import load_scorers

    return {
        t: load_scorers(f"models:/adrel-{t}/{registry[which][t]}", tracking_uri=registry["uri"])[t]
        for t in TASKS
    }


@pytest.fixture(scope="module")
def endpoints(_ray_owner, registry):
    """The app with direct ingress (the default) on free loopback ports, on a local Ray of its
    own: Serve's processes read the ingress settings when they start, so a cluster left by
    earlier tests is shut down first. Shut down (and the environment restored) at the end."""
    import ray
    from ray import serve

    from jobs.runtime import ensure_ray
    from serving.app import start
    from serving.config import ServeConfig

    cfg = ServeConfig.build(
        model="models:/adrel@champion",
        tracking_uri=registry["uri"],
        port=free_loopback_port(3),  # the replica, a spare, Serve's proxy
        num_cpus_per_replica=0,
        intra_op_threads=1,
        reload_interval_s=1,
        batching={"max_batch_size": MAX_BATCH, "batch_wait_ms": 20},
        limits=LIMITS,
    )
    env = cfg.ray_env()
    saved = {k: os.environ.get(k) for k in env}
    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(num_cpus=int(os.environ.get("ADREL_TEST_RAY_CPUS", "2")), env=env)
    try:
        yield cfg, start(cfg)
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def service(endpoints):
    with httpx.Client(base_url=endpoints[1].url, timeout=60) as client:
        yield client


def wait_for_versions(client, want: dict, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = {t: v["model_version"] for t, v in client.get("/v1/tasks").json()["tasks"].items()}
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_replaced_models_are_freed_by_reference_counting(export_v1):
    """A replica gc.freeze()s what it loaded, so the cycle collector never looks at those
    objects again: models a reload replaces must be freed by reference counting alone."""
    import gc
    import weakref

    from serving.app import ScoringService, load_models
    from serving.config import ServeConfig

    cfg = ServeConfig.build(model=str(export_v1))
    service = ScoringService(cfg, load_models(cfg))
    old = service.models
    refs = [weakref.ref(old)]
    for scorer in old.scorers.values():
        refs += [weakref.ref(scorer), weakref.ref(scorer.session)]
    del old, scorer
    gc.collect()
    gc.disable()
    try:
        reloaded = asyncio.run(service.reload())
        assert reloaded["reloaded"] is True
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()


@pytest.mark.parametrize("slots, largest_call, solo", [(2, 7, 0), (1, 13, 1)])
def test_a_free_model_slot_takes_its_share_of_the_waiting_requests(
    export_v1, slots, largest_call, solo
):
    """13 requests wait while every model slot is busy. The first slot to free takes its share
    (13 over 2 slots: 7), not the whole queue: a slot that took everything would hold all 13
    in one long call while the other slot had nothing. One slot takes them all, a call that
    runs alone (nothing else running or waiting); two calls side by side do not."""
    service, scorer = local_service(export_v1, 16, slots)
    rows = items(13, seed=3)

    async def run() -> list:
        service._free_slots = 0  # every slot busy
        calls = [asyncio.create_task(service._score_batch([row_chunk(scorer, r)])) for r in rows]
        await asyncio.sleep(0.05)  # every request is waiting for a slot
        assert len(service._waiting) == len(rows)
        service._free_slots = slots  # the slots free up
        service._start_calls()
        return [await (await c)[0] for c in calls]

    got = np.concatenate(asyncio.run(run()))
    np.testing.assert_allclose(got, reference(scorer, rows), atol=1e-6)
    sizes = service.stats.sizes
    assert sum(k * v for k, v in sizes.items()) == len(rows)
    assert max(sizes) == largest_call, dict(sizes)
    assert service.stats.solo_calls == solo
    # The queue in front of the slots, as /v1/stats reports it: every chunk was taken once
    # after waiting at least the 50 ms the slots were held; the first call saw all 13 waiting.
    snap = service.stats.snapshot()
    assert snap["queued_chunks"] == len(rows)
    assert snap["queue_ms_total"] >= 50 * len(rows)
    calls = snap["batches"]
    assert len(rows) + (calls - 1) <= snap["waiting_items_at_take_total"] <= len(rows) * calls


def test_a_free_slot_beside_a_long_call_takes_every_waiting_request(export_v1):
    """Two slots; one runs a call of 6 items while 2 requests wait. The free slot takes both:
    its share of the 8 items in the model's hands is 4. (A share of what waits alone, 1, left
    a request behind for the slot busy with the long call.)"""
    service, scorer = local_service(export_v1, 16, 2)
    rows = items(2, seed=11)

    async def run() -> list:
        service._free_slots = 0
        futures = service._enqueue([row_chunk(scorer, r) for r in rows])
        service._free_slots, service._running_items = 1, 6  # the other slot: a call of 6
        service._start_calls()
        return list(await asyncio.gather(*futures))

    got = np.concatenate(asyncio.run(run()))
    np.testing.assert_allclose(got, reference(scorer, rows), atol=1e-6)
    assert dict(service.stats.sizes) == {2: 1}
    assert service._running_items == 6 and service._free_slots == 1


def test_a_request_answers_when_its_own_call_ends(export_v1):
    """A request answers as soon as the call holding its chunk ends: it never waits for, or
    runs, a later call that carries only other requests' chunks. One slot, calls of two;
    A, B and C wait while the slot is busy. The first call takes A and B, the next C: B
    answers after one call, not two."""
    service, scorer = local_service(export_v1, 2, 1)
    rows = items(3, seed=5)
    calls_done_when_answered: dict[str, int] = {}

    async def one(name: str, r: dict) -> np.ndarray:
        chunk = row_chunk(scorer, r)
        out = await (await service._score_batch([chunk]))[0]
        calls_done_when_answered[name] = service.stats.batches
        return out

    async def run() -> list:
        service._free_slots = 0  # the slot is busy
        tasks = [asyncio.create_task(one(n, r)) for n, r in zip("ABC", rows)]
        await asyncio.sleep(0.05)
        assert len(service._waiting) == 3
        service._free_slots = 1
        service._start_calls()
        return [await t for t in tasks]

    got = np.concatenate(asyncio.run(run()))
    np.testing.assert_allclose(got, reference(scorer, rows), atol=1e-6)
    assert dict(service.stats.sizes) == {2: 1, 1: 1}
    assert calls_done_when_answered == {"A": 1, "B": 1, "C": 2}
    assert not service._calls and service._free_slots == 1
    assert service.stats.solo_calls == 1  # C's call: nothing else running or waiting


def test_requests_of_one_serve_batch_answer_when_their_own_calls_end(export_v1):
    """Serve's batcher hands A, B and C over as one batch while the model slot is busy; the
    slot's calls hold two items, so A and B go in the first call and C in the next. Serve
    answers a batch's callers only when its body returns: the body returns at once, a future
    per chunk, and A and B are answered after the first call. (A body that awaited its
    chunks' calls held A and B until C's call ended.)"""
    service, scorer = local_service(export_v1, 2, 1)
    rows = items(3, seed=7)
    chunks = [row_chunk(scorer, r) for r in rows]
    calls_done_when_answered: dict[str, int] = {}

    async def run() -> list:
        service._free_slots = 0  # the slot is busy
        body = asyncio.create_task(service._score_batch(chunks))  # as Serve calls it
        await asyncio.sleep(0.05)
        assert body.done(), "the batch body waited for the model"
        futures = body.result()
        for name, f in zip("ABC", futures):
            f.add_done_callback(
                lambda _, n=name: calls_done_when_answered.setdefault(n, service.stats.batches)
            )
        service._free_slots = 1
        service._start_calls()
        return list(await asyncio.gather(*futures))

    got = np.concatenate(asyncio.run(run()))
    np.testing.assert_allclose(got, reference(scorer, rows), atol=1e-6)
    assert dict(service.stats.sizes) == {2: 1, 1: 1}
    assert calls_done_when_answered == {"A": 1, "B": 1, "C": 2}


def test_a_request_that_went_away_is_not_scored(export_v1):
    """A request cancelled (its client went away) while its chunk waits for a slot: its chunk
    leaves the queue unscored, and the others are scored as usual."""
    service, scorer = local_service(export_v1, 4, 1)
    rows = items(3, seed=9)

    async def one(r: dict) -> np.ndarray:
        chunk = row_chunk(scorer, r)
        return await (await service._score_batch([chunk]))[0]

    async def run() -> list:
        service._free_slots = 0
        tasks = [asyncio.create_task(one(r)) for r in rows]
        await asyncio.sleep(0.05)
        tasks[1].cancel()
        await asyncio.sleep(0)
        service._free_slots = 1
        service._start_calls()
        return [await tasks[0], await tasks[2]]

    got = np.concatenate(asyncio.run(run()))
    np.testing.assert_allclose(got, reference(scorer, [rows[0], rows[2]]), atol=1e-6)
    assert service.stats.items == 2 and not service._waiting


def test_a_draining_replica_turns_unhealthy_then_refuses_new_requests(export_v1):
    """The replica's HTTP app in this process, drain_s 0.3. Told to drain, it answers /healthz
    with 503 at once and keeps scoring through the window; after it, a new request gets 503
    with `Connection: close` and `Retry-After`, while the requests admitted before get their
    scores; `drained` returns only once those are answered."""
    from serving.app import build_api

    service, scorer = local_service(export_v1, 4, 1, drain_s=0.3)

    async def unbatched(chunk):  # Serve's batch queue needs a replica: a batch of one each
        return (await service._score_batch([chunk]))[0]

    service._batched = unbatched
    api = build_api(service)
    rows = items(2, seed=13)
    want = reference(scorer, rows)

    async def run() -> None:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as c:

            def post(row: dict):
                return c.post("/v1/score", json={"task": "search", "items": [row]})

            assert (await c.get("/healthz")).status_code == 200
            service._free_slots = 0  # the model slot is busy: admitted requests wait
            a = asyncio.create_task(post(rows[0]))
            await asyncio.sleep(0.05)
            assert service.in_flight == 1
            service.begin_drain()
            health = await c.get("/healthz")
            assert (health.status_code, health.json()["status"]) == (503, "draining")
            b = asyncio.create_task(post(rows[1]))  # inside the window: admitted
            await asyncio.sleep(0.05)
            assert service.in_flight == 2
            drained = asyncio.create_task(service.drained())
            await asyncio.sleep(0.35)  # the window is over
            refused = await post(rows[0])
            assert refused.status_code == 503, refused.text
            assert "shutting down" in refused.json()["detail"]
            assert refused.headers["connection"] == "close"
            assert refused.headers["retry-after"] == "1"
            reload = await c.post("/v1/reload")
            assert reload.status_code == 503, reload.text
            assert not drained.done()  # a and b are still waiting for the model
            service._free_slots = 1
            service._start_calls()
            got = [(await t) for t in (a, b)]
            assert [r.status_code for r in got] == [200, 200], [r.text for r in got]
            scores = [r.json()["scores"][0] for r in got]
            np.testing.assert_allclose(scores, want, atol=1e-6)
            await asyncio.wait_for(drained, timeout=5)
            stats = (await c.get("/v1/stats")).json()
            assert stats["draining"] is True and stats["refused_draining"] == 2
            assert service.in_flight == 0

    asyncio.run(run())


def test_app_control_passes_reloads_and_drains_between_replicas(ray_local):
    """The AppControl actor on a real local Ray, as two replicas "a" and "b" use it: a reload
    announced wakes the replicas waiting for one, and the wait for their reports ends when all
    have reported (reports on an older reload do not count) or at its timeout with those that
    did; the drain likewise. A new deployment (reset) waits for a drain of its own."""
    from serving.app import AppControl

    ray = ray_local
    control = AppControl.remote()

    def pending(ref) -> bool:
        return not ray.wait([ref], timeout=0.2)[0]

    seen = ray.get(control.reload_generation.remote())
    waiting = control.wait_reload.remote(seen)
    assert pending(waiting)
    generation = ray.get(control.announce_reload.remote())
    assert generation == seen + 1 and ray.get(waiting, timeout=10) == generation
    new = {"reloaded": True, "model_versions": {"search": "2"}}
    ray.get(control.report_reloaded.remote("a", generation, new))
    ray.get(control.report_reloaded.remote("b", seen, {"model_versions": {"search": "1"}}))
    assert ray.get(control.wait_reloaded.remote(generation, 2, 0.3)) == {"a": new}  # timed out
    both = control.wait_reloaded.remote(generation, 2, 60)
    assert pending(both)
    ray.get(control.report_reloaded.remote("b", generation, new))
    assert ray.get(both, timeout=10) == {"a": new, "b": new}

    drain = control.wait_drain.remote()
    assert pending(drain)
    ray.get(control.drain.remote())
    assert ray.get(drain, timeout=10) is True
    ray.get(control.report_drained.remote("a"))
    assert ray.get(control.wait_drained.remote(2, 0.3)) == 1  # b never drained: the timeout
    ray.get(control.reset.remote())
    assert pending(control.wait_drain.remote())
    assert ray.get(control.wait_drained.remote(1, 0.1)) == 0
    ray.kill(control)


def test_app_control_outlives_the_process_that_started_the_app(ray_local):
    """On a shared cluster the Serve app outlives a SIGKILLed `adrel serve`, and so must its
    AppControl (detached), or the replicas stop following each other's reloads;
    remove_control ends it once the app is deleted."""
    import signal

    from serving.app import CONTROL_NAMESPACE, control_name, remove_control

    ray = ray_local
    name = control_name("outlives")
    code = (
        "import sys, time, ray; from serving.app import create_control; "
        "ray.init(address=sys.argv[1]); c = create_control('outlives'); "
        "ray.get(c.announce_reload.remote()); print('ready', flush=True); time.sleep(600)"
    )
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-c", code, address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert driver.stdout.readline().strip() == "ready"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    time.sleep(3)  # the cluster notices the driver's death and ends what it owned
    control = ray.get_actor(name, namespace=CONTROL_NAMESPACE)
    assert ray.get(control.reload_generation.remote(), timeout=30) == 1

    assert remove_control("outlives")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=CONTROL_NAMESPACE)
        except ValueError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"{name} still exists after remove_control")
    assert not remove_control("outlives")


def test_scores_equal_the_scorers_in_item_order(service, registry):
    ref = scorers(registry, "v1")
    rows = items(2 * MAX_BATCH + 5)  # more items than one batch holds: split and rejoined
    for task in TASKS:
        r = service.post("/v1/score", json={"task": task, "items": rows})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == task
        assert body["model_version"] == registry["v1"][task]
        np.testing.assert_allclose(body["scores"], reference(ref[task], rows), atol=1e-6)
    # the tasks' models differ, so a mix-up of tasks would show
    a = service.post("/v1/score", json={"task": "search", "items": rows[:3]}).json()["scores"]
    b = service.post("/v1/score", json={"task": "shopping", "items": rows[:3]}).json()["scores"]
    assert not np.allclose(a, b)
    empty = service.post("/v1/score", json={"task": "search", "items": []})
    assert empty.status_code == 200 and empty.json()["scores"] == []


def test_replicas_answer_directly_and_through_serves_proxy(endpoints, registry):
    cfg, ends = endpoints
    assert ends.url == f"http://127.0.0.1:{cfg.port}"  # the one replica took the first port
    assert ends.replica_urls == (ends.url,)
    assert ends.proxy_url == f"http://127.0.0.1:{cfg.port + 2}" != ends.url
    rows = items(5, seed=3)
    ref = reference(scorers(registry, "v1")["search"], rows)
    for url in (ends.url, ends.proxy_url):
        r = httpx.post(f"{url}/v1/score", json={"task": "search", "items": rows}, timeout=60)
        assert r.status_code == 200, (url, r.text)
        np.testing.assert_allclose(r.json()["scores"], ref, atol=1e-6)
    bad = httpx.post(f"{ends.url}/v1/score", json={"task": "nope", "items": rows}, timeout=60)
    assert bad.status_code == 404 and "nope" in bad.json()["detail"]


def test_tasks_health_and_docs(service, registry):
    info = service.get("/v1/tasks").json()
    assert {t: v["model_version"] for t, v in info["tasks"].items()} == registry["v1"]
    assert info["batching"]["max_batch_size"] == MAX_BATCH
    assert info["limits"]["max_items"] == LIMITS["max_items"]
    assert service.get("/healthz").json() == {"status": "ok", "tasks": TASKS}
    spec = service.get("/openapi.json").json()
    assert {"/v1/score", "/v1/tasks", "/v1/reload", "/healthz"} <= set(spec["paths"])
    assert "ScoreRequest" in json.dumps(spec["paths"]["/v1/score"])
    assert service.get("/docs").status_code == 200


def test_bad_input_gets_its_status_and_the_service_keeps_answering(service):
    ok_item = {"query": "red shoes", "ad_title": "Running shoes"}
    cases = [
        ("malformed JSON", {"content": b'{"task": "search", "items": [', "headers": {"content-type": "application/json"}}, 422, "body"),
        ("invalid UTF-8", {"content": b'{"task": "search", "items": [{"query": "\xff\xfe", "ad_title": "t"}]}', "headers": {"content-type": "application/json"}}, 422, "body: the body cannot be read as JSON"),
        ("nesting too deep", {"content": b"[" * 30_000 + b"]" * 30_000, "headers": {"content-type": "application/json"}}, 422, "body: the body cannot be read as JSON"),
        ("missing task", {"json": {"items": [ok_item]}}, 422, "task"),
        ("missing ad_title", {"json": {"task": "search", "items": [ok_item, {"query": "q"}]}}, 422, "items[1].ad_title"),
        ("items not a list", {"json": {"task": "search", "items": "red shoes"}}, 422, "items"),
        ("query not a string", {"json": {"task": "search", "items": [{"query": 3, "ad_title": "t"}]}}, 422, "items[0].query"),
        ("unknown field", {"json": {"task": "search", "items": [{**ok_item, "ad_desc": "x"}]}}, 422, "items[0].ad_desc"),
        ("blank query", {"json": {"task": "search", "items": [ok_item, {**ok_item, "query": " \t "}]}}, 422, "items[1].query: Value error, must contain a character other than whitespace"),
        ("blank ad_title", {"json": {"task": "search", "items": [{**ok_item, "ad_title": "\u3000"}]}}, 422, "items[0].ad_title"),
        ("unknown task", {"json": {"task": "nope", "items": [ok_item]}}, 404, "nope"),
        ("too many items", {"json": {"task": "search", "items": [ok_item] * (LIMITS["max_items"] + 1)}}, 413, "items"),
        ("text too long", {"json": {"task": "search", "items": [ok_item, {**ok_item, "ad_description": "x" * 301}]}}, 413, "items[1].ad_description"),
        ("body too large", {"json": {"task": "search", "items": [ok_item] * 3000}}, 413, "bytes"),
        ("text/plain", {"content": json.dumps({"task": "search", "items": [ok_item]}), "headers": {"content-type": "text/plain"}}, 415, "application/json"),
        ("no content type", {"content": b"{}"}, 415, "application/json"),
    ]  # fmt: skip
    for name, kwargs, status, mention in cases:
        r = service.post("/v1/score", **kwargs)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        assert mention in r.json()["detail"], f"{name}: {r.text}"
        good = service.post("/v1/score", json={"task": "search", "items": [ok_item]})
        assert good.status_code == 200, f"after {name}: {good.text}"
    assert service.get("/healthz").status_code == 200


def test_concurrent_requests_are_batched(service, registry):
    ref = scorers(registry, "v1")["shopping"]
    rows = items(48, seed=1)
    before = service.get("/v1/stats").json()

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(service.base_url), timeout=60) as ac:
            body = [{"task": "shopping", "items": [row]} for row in rows]
            return await asyncio.gather(*(ac.post("/v1/score", json=b) for b in body))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [
        r.text for r in responses if r.status_code != 200
    ]
    got = np.array([r.json()["scores"][0] for r in responses])
    np.testing.assert_allclose(got, reference(ref, rows), atol=1e-6)  # each its own score
    after = service.get("/v1/stats").json()
    new = {
        int(k): v - before["batch_items_histogram"].get(k, 0)
        for k, v in after["batch_items_histogram"].items()
    }
    assert after["items"] - before["items"] == len(rows)
    assert max(k for k, v in new.items() if v > 0) > 1, new  # several requests in one model call
    assert max(new) <= MAX_BATCH
    assert after["batches"] - before["batches"] < len(rows)
    # This app waits batch_wait_ms for more requests: no request skips the batch queue.
    assert after["idle_requests"] == before["idle_requests"] == 0


def test_reload_swaps_the_champion_without_dropping_requests(service, registry):
    refs = {"v1": scorers(registry, "v1")["search"], "v2": scorers(registry, "v2")["search"]}
    version_of = {registry[k]["search"]: k for k in ("v1", "v2")}
    rows = items(4, seed=2)
    set_champion(registry, "v2")

    async def load_during_reload():
        async with httpx.AsyncClient(base_url=str(service.base_url), timeout=60) as ac:

            async def stream(n: int) -> list[httpx.Response]:
                out = []
                for _ in range(n):
                    out.append(await ac.post("/v1/score", json={"task": "search", "items": rows}))
                return out

            streams = [asyncio.create_task(stream(15)) for _ in range(3)]
            await asyncio.sleep(0.05)
            reload = await ac.post("/v1/reload")
            return reload, [r for s in streams for r in await s]

    # A body would suggest it picks what is loaded: refused.
    refused = service.post("/v1/reload", json={"model": "models:/adrel-search/1"})
    assert refused.status_code == 422 and "takes no body" in refused.json()["detail"]
    reload, responses = asyncio.run(load_during_reload())
    assert reload.status_code == 200, reload.text
    assert reload.json()["model_versions"] == registry["v2"]
    (replica,) = reload.json()["replicas"]  # the app's one replica, on the new models
    assert reload.json()["replicas"][replica]["model_versions"] == registry["v2"]
    assert reload.json()["missing"] == 0
    assert all(r.status_code == 200 for r in responses), [
        r.text for r in responses if r.status_code != 200
    ]
    for r in responses:  # each answer is wholly from one version, and labelled with it
        body = r.json()
        np.testing.assert_allclose(
            body["scores"], reference(refs[version_of[body["model_version"]]], rows), atol=1e-6
        )
    now = service.post("/v1/score", json={"task": "search", "items": rows}).json()
    assert now["model_version"] == registry["v2"]["search"]
    np.testing.assert_allclose(now["scores"], reference(refs["v2"], rows), atol=1e-6)
    assert not np.allclose(reference(refs["v1"], rows), reference(refs["v2"], rows))


def test_periodic_check_follows_the_alias(service, registry):
    set_champion(registry, "v1")  # no /v1/reload: the replica's check (every 1 s) notices
    assert wait_for_versions(service, registry["v1"]) == registry["v1"]


def test_reload_refuses_a_source_that_drops_a_task(service, registry):
    from mlflow.tracking import MlflowClient

    set_champion(registry, "v1")  # whatever the tests before left
    assert wait_for_versions(service, registry["v1"]) == registry["v1"]
    client = MlflowClient(registry["uri"], registry["uri"])
    client.delete_registered_model_alias("adrel-shopping", "champion")
    try:
        r = service.post("/v1/reload")
        assert r.status_code == 409, r.text
        assert "shopping" in r.json()["detail"]
        ok = service.post("/v1/score", json={"task": "shopping", "items": items(2)})
        assert ok.status_code == 200 and ok.json()["model_version"] == registry["v1"]["shopping"]
    finally:
        from pipeline.registry import promote

        promote("shopping", registry["v1"]["shopping"], reason="test", tracking_uri=registry["uri"])
