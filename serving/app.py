"""The online scoring service: a Ray Serve deployment behind a FastAPI ingress.

    POST /v1/score    {"task", "items": [{"query", "ad_title", "ad_description"?}]}
                      -> {"task", "model_version", "scores"} (probabilities, in item order)
    GET  /v1/tasks    tasks served, their model versions, batching settings and limits
    GET  /v1/stats    this replica's batch sizes (how much dynamic batching gathers)
    GET  /healthz     liveness (503 once the replica is draining: take it out of rotation)
    POST /v1/reload   load the model source again (e.g. a moved alias) and swap it in, on
                      every replica (the one asked first, then the others follow)
    GET  /docs, /openapi.json

Concurrent requests are gathered by `@serve.batch`; batches that wait for a busy model are
merged into its next calls (each takes its share of the waiting items over the model slots, at
most max_batch_size items, one ORT run per task). A request answers as soon as the calls
holding its own items end, whatever else its batch or those calls carry. A request
that finds the replica idle (nothing waiting, a model slot free, no batch wait configured)
is scored at once, past Serve's batch queue. A replica
holds one `ModelSet` (a Scorer per task); a reload builds the new set beside it and swaps the
reference, so requests already admitted finish on the models they started with.
Stopping (`drain`, which `adrel serve` calls on SIGTERM before Serve stops the replicas): each
replica answers /healthz with 503 at once, keeps scoring for drain_s (time for a load balancer
to take it out), then refuses new requests with 503 and `Connection: close` while the ones it
admitted finish. Serve's own stop of a replica waits for a moment with no request in flight;
under steady load that moment never comes, and at the end of its grace period Serve kills the
replica with what it holds. After the drain it stops the replica at once.
The replica runs merged ONNX graphs through serving.scorer only: no torch, no models/.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from starlette.exceptions import HTTPException

from serving.config import BatchingConfig, LimitsConfig, ServeConfig

logger = logging.getLogger("ray.serve")

API_VERSION = "1"
# FastAPI's 400 for a body json.loads raised on with something other than a decode error.
FASTAPI_BODY_UNREADABLE = "There was an error parsing the body"


# ---- request and response bodies ----------------------------------------------------------


class Item(BaseModel):
    """One query–ad pair."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, description="The user's search query.")
    ad_title: str = Field(min_length=1, description="The ad's title.")
    ad_description: str | None = Field(None, description="The ad's description (optional).")

    @field_validator("query", "ad_title")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        # As the batch contract (features.validate: empty_query, empty_ad_title).
        if not v.strip():
            raise ValueError("must contain a character other than whitespace")
        return v


class ScoreRequest(BaseModel):
    """Pairs to score with one task's model."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, description="Task name, one of GET /v1/tasks.")
    items: list[Item] = Field(description="Pairs to score; scores come back in this order.")


class ScoreResponse(BaseModel):
    task: str
    model_version: str = Field(description="Version of the model that scored every item.")
    scores: list[float] = Field(description="Relevance probability per item, in item order.")


class TaskInfo(BaseModel):
    model_version: str
    max_length: int


class TasksResponse(BaseModel):
    source: str
    loaded_at: float = Field(description="Unix time the serving models were loaded.")
    tasks: dict[str, TaskInfo]
    batching: BatchingConfig
    limits: LimitsConfig


class ReplicaReload(BaseModel):
    reloaded: bool | None = None
    model_versions: dict[str, str]
    error: str | None = Field(None, description="Why this replica kept its models.")


class ReloadResponse(BaseModel):
    replica: str = Field(description="The replica that was asked; the others follow it.")
    reloaded: bool
    previous: dict[str, str]
    model_versions: dict[str, str]
    replicas: dict[str, ReplicaReload] = Field(
        description="Every replica's models after the reload, by replica id."
    )
    missing: int = Field(description="Replicas that did not report within the wait.")


class ErrorResponse(BaseModel):
    detail: Any


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown task."},
    413: {"model": ErrorResponse, "description": "Too many items, text or body too long."},
    415: {"model": ErrorResponse, "description": "Content-Type is not application/json."},
    422: {"model": ErrorResponse, "description": "Malformed JSON or a missing/invalid field."},
    503: {"model": ErrorResponse, "description": "This replica is shutting down: retry another."},
}


class ServiceError(Exception):
    """A request the service refuses, with its HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


# ---- models and batching ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSet:
    """The Scorers a replica serves, loaded together from one source.

    state: what the source pointed at just before loading (see `source_state`); the periodic
    check reloads when it changes.
    """

    scorers: Mapping[str, Any]  # task -> serving.scorer.Scorer
    source: str
    loaded_at: float
    state: dict[str, str] | None = None

    def versions(self) -> dict[str, str]:
        return {task: str(s.model_version) for task, s in self.scorers.items()}


def source_state(cfg: ServeConfig) -> dict[str, str] | None:
    """What the source points at now, without loading a model; None when it cannot move.

    A directory: each task's model_version (a hash of its graph; a re-export changes it).
    `models:/<name>@<alias>` or `/latest`: the version it resolves to. `models:/<prefix>@<alias>`
    (one model per task): each task model's version at the alias. A fixed version or run: None.
    """
    versions, by_task = _source_versions(cfg)
    if versions is None or not by_task or cfg.tasks is None:
        return versions
    return {t: v for t, v in versions.items() if t in cfg.tasks}


def check_source(cfg: ServeConfig) -> None:
    """Fail fast, before any replica starts, when the source holds nothing to serve."""
    versions, by_task = _source_versions(cfg)
    if versions is None:
        return
    if not versions:
        raise ValueError(f"model {cfg.model!r}: no task model carries that alias")
    missing = sorted(set(cfg.tasks or ()) - set(versions)) if by_task else []
    if missing:
        raise ValueError(
            f"model {cfg.model!r} has no model for task(s) {missing}; it has {sorted(versions)}"
        )


def _source_versions(cfg: ServeConfig) -> tuple[dict[str, str] | None, bool]:
    """(versions, keyed by task) of every model the source points at; (None, False): fixed."""
    from pipeline import model_uri as mu

    ref = mu.parse_model_uri(cfg.model)
    if ref.kind == "local":
        root = Path(ref.path)
        if not root.is_dir():
            raise ValueError(f"model {cfg.model!r}: no such directory")
        if (root / "index.json").is_file():
            dirs = {t: root / t for t in json.loads((root / "index.json").read_text())["tasks"]}
        elif (root / "meta.json").is_file():
            dirs = {json.loads((root / "meta.json").read_text())["task"]: root}
        elif any(root.rglob("meta.json")):
            return None, False  # e.g. a downloaded MLflow model folder: the Scorer finds it
        else:
            raise ValueError(
                f"model {cfg.model!r} holds no exported model (index.json or meta.json): "
                "give an `adrel export` directory or a models:/ URI"
            )
        return {
            t: str(json.loads((d / "meta.json").read_text())["model_version"])
            for t, d in dirs.items()
        }, True
    if ref.kind != "models" or not (ref.alias or ref.version == "latest"):
        return None, False
    if mu.registered_model_exists(ref.name, cfg.tracking_uri):
        return {ref.name: str(mu.registered_version(ref, cfg.tracking_uri).version)}, False
    if not ref.alias:
        raise ValueError(f"model {cfg.model!r}: no registered model {ref.name!r}")
    return mu.task_model_versions(ref.name, ref.alias, None, cfg.tracking_uri), True


def load_models(cfg: ServeConfig) -> ModelSet:
    """Load every task's Scorer from the configured source (directory or models:/ URI)."""
    from serving.scorer import load_scorers

    state = source_state(cfg)
    scorers = load_scorers(
        cfg.model,
        tasks=cfg.tasks,
        providers=cfg.providers,
        intra_op_threads=cfg.ort_threads(),
        tracking_uri=cfg.tracking_uri,
        spin_wait=cfg.ort_spin_wait,
        solo_threads=cfg.ort_solo_threads(),
    )
    if not scorers:
        raise ValueError(f"the model source {cfg.model!r} holds no task models")
    return ModelSet(dict(scorers), cfg.model, time.time(), state)


@dataclass(frozen=True, eq=False)
class Chunk:
    """Part of one request (at most max_batch_size items) for one Scorer: a batch element."""

    scorer: Any
    queries: list[str]
    titles: list[str]
    descriptions: list[str | None] | None
    created: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class Waiting:
    """A chunk handed to the batcher, waiting for a model call to take it."""

    chunk: Chunk
    result: asyncio.Future
    since: float = field(default_factory=time.perf_counter)


def chunk_items(chunks: Sequence[Chunk]) -> int:
    """The batch size Serve counts: items, not requests."""
    return sum(len(c.queries) for c in chunks)


class BatchStats:
    """How many items each model call held (does dynamic batching gather?), how many requests
    found the replica idle, and where a request's time goes inside the replica (model call vs
    the whole handler)."""

    def __init__(self, window: int = 2048) -> None:
        self.batches = 0
        self.requests = 0
        self.idle_requests = 0  # scored at once on an idle replica, past Serve's batch queue
        self.solo_calls = 0  # model calls that ran alone, on the solo sessions where present
        self.refused_draining = 0  # requests refused with 503 while the replica stopped
        self.items = 0
        self.sizes: Counter[int] = Counter()
        self.model_ms: deque[float] = deque(maxlen=window)
        self.handler_ms: deque[float] = deque(maxlen=window)
        # Running totals: differences of two snapshots give the means over the requests between.
        self.model_ms_total = 0.0
        self.chunk_call_ms_total = 0.0
        self.handled = 0
        self.handler_ms_total = 0.0
        # The queue in front of the model slots: items waiting when a call is taken (summed
        # over calls), and each chunk's wait from joining the queue to being taken.
        self.waiting_items_at_take_total = 0
        self.queued_chunks = 0
        self.queue_ms_total = 0.0
        # Before that queue: from the request making a chunk to the batch body receiving it
        # (Serve's batch queue and the event loop's hops).
        self.batcher_chunks = 0
        self.batcher_ms_total = 0.0

    def record(self, requests: int, items: int, model_ms: float) -> None:
        self.batches += 1
        self.requests += requests
        self.items += items
        self.sizes[items] += 1
        self.model_ms.append(model_ms)
        self.model_ms_total += model_ms
        self.chunk_call_ms_total += model_ms * requests  # each chunk's own call, summed

    def record_take(self, waiting_items: int, call: Sequence[Waiting], now: float) -> None:
        self.waiting_items_at_take_total += waiting_items
        self.queued_chunks += len(call)
        self.queue_ms_total += sum(now - w.since for w in call) * 1e3

    def record_handler(self, ms: float) -> None:
        self.handled += 1
        self.handler_ms.append(ms)
        self.handler_ms_total += ms

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "idle_requests": self.idle_requests,
            "solo_calls": self.solo_calls,
            "refused_draining": self.refused_draining,
            "items": self.items,
            "max_batch_items": max(self.sizes, default=0),
            "mean_batch_items": self.items / self.batches if self.batches else 0.0,
            "batch_items_histogram": {str(k): v for k, v in sorted(self.sizes.items())},
            "model_call_ms_p50": _median(self.model_ms),
            "handler_ms_p50": _median(self.handler_ms),
            "model_call_ms_total": self.model_ms_total,
            "chunk_call_ms_total": self.chunk_call_ms_total,
            "handled": self.handled,
            "handler_ms_total": self.handler_ms_total,
            "waiting_items_at_take_total": self.waiting_items_at_take_total,
            "queued_chunks": self.queued_chunks,
            "queue_ms_total": self.queue_ms_total,
            "batcher_chunks": self.batcher_chunks,
            "batcher_ms_total": self.batcher_ms_total,
        }


def _median(xs: deque[float]) -> float | None:
    return float(np.median(xs)) if xs else None


class ScoringService:
    """Validates requests, batches them per task, scores, reloads. Knows nothing of HTTP."""

    def __init__(self, cfg: ServeConfig, models: ModelSet | None = None):
        self.cfg = cfg
        self.models = models if models is not None else load_models(cfg)
        self.stats = BatchStats()
        self._reload_lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        self.draining_since: float | None = None  # time.monotonic() when the drain began
        self.in_flight = 0  # HTTP requests being handled (InFlightCounter)
        self.peers: Peers | None = None  # the app's other replicas (set in a Serve replica)
        b = cfg.batching
        self._waiting: deque[Waiting] = deque()
        self._free_slots = b.max_concurrent_batches  # model slots without a call running
        self._calls: set[asyncio.Task] = set()
        self._running_items = 0  # items in the model calls running now
        self._batched_in_flight = 0  # requests on their way through Serve's batch queue
        # Decorated per instance so that every batching setting comes from the config. Serve
        # hands over the batches it forms (about one per admitted request at most); the model slots
        # above bound the model calls, and batches waiting for one are merged (_score_batch).
        logging.getLogger("ray.serve").addFilter(_no_batch_limit_warning)
        self._batched = serve.batch(
            max_batch_size=b.max_batch_size,
            batch_wait_timeout_s=b.batch_wait_s,
            max_concurrent_batches=cfg.ongoing_requests,
            batch_size_fn=chunk_items if b.max_batch_size > 1 else None,
        )(self._score_batch)

    async def score(self, req: ScoreRequest) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.check_accepting()
        scorer = self.models.scorers.get(req.task)  # pinned: a reload does not change it
        if scorer is None:
            known = sorted(self.models.scorers)
            raise ServiceError(404, f"unknown task {req.task!r}; this service scores {known}")
        self.check_limits(req)
        if not req.items:
            return {"task": req.task, "model_version": str(scorer.model_version), "scores": []}
        chunks = self.chunks(scorer, req)
        if self._idle():
            # Nothing to gather with: queue for a model slot at once, without the hops through
            # Serve's batch queue (about a millisecond on a small CPU host). Requests that
            # arrive meanwhile find the model busy and go through the batcher as usual.
            self.stats.idle_requests += 1
            futures = self._enqueue(chunks)
        else:
            self._batched_in_flight += 1
            try:
                futures = await asyncio.gather(*(self._batched(c) for c in chunks))
            finally:
                self._batched_in_flight -= 1
        # Only this request's chunks: it answers when the calls holding them end.
        parts = await asyncio.gather(*futures)
        for p in parts:
            if isinstance(p, BaseException):
                raise p
        scores = np.concatenate(parts)  # (N,)
        self.stats.record_handler((time.perf_counter() - t0) * 1e3)
        return {
            "task": req.task,
            "model_version": str(scorer.model_version),
            "scores": scores.astype(np.float64).tolist(),
        }

    # -- stopping ------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """The replica is being stopped: report unhealthy now, refuse new work after drain_s."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            logger.info(
                "adrel serve: draining: /healthz answers 503; new requests are refused in %.1fs",
                self.cfg.drain_s,
            )

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def accepting(self) -> bool:
        """False once the drain window (drain_s) has passed."""
        return (
            self.draining_since is None or time.monotonic() - self.draining_since < self.cfg.drain_s
        )

    async def drained(self, poll_s: float = 0.02) -> None:
        """Returns once the replica refuses new requests and has answered those it admitted."""
        while self.accepting() or self.in_flight:
            await asyncio.sleep(poll_s)

    def check_accepting(self) -> None:
        if not self.accepting():
            self.stats.refused_draining += 1
            raise ServiceError(
                503,
                "this replica is shutting down: send the request to another replica",
                headers={"Connection": "close", "Retry-After": "1"},
            )

    def _idle(self) -> bool:
        """No batch waits and a model slot is free, and batches are not told to wait for more
        requests (batch_wait_ms 0): a request now would form a batch of its own anyway."""
        return (
            self.cfg.batching.batch_wait_ms == 0
            and not self._waiting
            and self._free_slots > 0
            and self._batched_in_flight == 0
        )

    def check_limits(self, req: ScoreRequest) -> None:
        lim = self.cfg.limits
        if len(req.items) > lim.max_items:
            raise ServiceError(
                413, f"items: {len(req.items)} items, at most {lim.max_items} per request"
            )
        for i, item in enumerate(req.items):
            for name in ("query", "ad_title", "ad_description"):
                text = getattr(item, name)
                if text is not None and len(text) > lim.max_text_chars:
                    raise ServiceError(
                        413,
                        f"items[{i}].{name}: {len(text)} characters, at most {lim.max_text_chars}",
                    )

    def chunks(self, scorer: Any, req: ScoreRequest) -> list[Chunk]:
        size = self.cfg.batching.max_batch_size
        out = []
        for start in range(0, len(req.items), size):
            items = req.items[start : start + size]
            descs = [it.ad_description for it in items]
            out.append(
                Chunk(
                    scorer,
                    [it.query for it in items],
                    [it.ad_title for it in items],
                    descs if any(d is not None for d in descs) else None,
                )
            )
        return out

    async def _score_batch(self, chunks: list[Chunk]) -> list[asyncio.Future]:
        """The `@serve.batch` body: hand a batch's chunks to the model slots and return at
        once, a future per chunk, which each request awaits itself.

        Serve answers the callers of a batch only when its body returns. A body that awaited
        its chunks' results would hold every request of the batch until the last call
        carrying any of them ended, though the slots split a batch over several calls.
        """
        return self._enqueue(chunks)

    def _enqueue(self, chunks: Sequence[Chunk]) -> list[asyncio.Future]:
        """Queue chunks for the model slots and start a call on every free slot.

        Serve closes a batch as soon as its wait is over and queues it while the model is
        busy, so under load a train of small batches would form. Here chunks wait for a
        model slot together: whenever a slot is free, a call takes the oldest waiting chunks,
        its share of them over the slots (`_share`). An idle replica scores at once, a busy one
        merges what waits. The model calls run off the event loop; a future per chunk holds
        its scores (an exception when its Scorer failed).
        """
        loop = asyncio.get_running_loop()
        mine = [Waiting(c, loop.create_future()) for c in chunks]
        self.stats.batcher_chunks += len(mine)
        self.stats.batcher_ms_total += sum(w.since - w.chunk.created for w in mine) * 1e3
        self._waiting.extend(mine)
        self._start_calls()
        return [w.result for w in mine]

    def _start_calls(self) -> None:
        """Start a model call on every free slot while chunks wait."""
        if any(w.result.done() for w in self._waiting):  # their requests went away
            self._waiting = deque(w for w in self._waiting if not w.result.done())
        while self._waiting and self._free_slots > 0:
            waiting = self._waiting_items()
            call = self._take(self._share(waiting))
            self.stats.record_take(waiting, call, time.perf_counter())
            # Alone: no other call runs and nothing is left waiting for one (the solo session,
            # with the threads of the idle slots).
            slots = self.cfg.batching.max_concurrent_batches
            solo = self._free_slots == slots and not self._waiting
            self.stats.solo_calls += solo
            self._free_slots -= 1
            self._running_items += chunk_items([w.chunk for w in call])
            task = asyncio.get_running_loop().create_task(self._call(call, solo))
            self._calls.add(task)  # a reference until it ends: the loop holds tasks weakly
            task.add_done_callback(self._calls.discard)

    async def _call(self, call: list[Waiting], solo: bool = False) -> None:
        try:
            await self._run(call, solo)
        except asyncio.CancelledError:  # the replica shutting down: nobody waits forever
            for w in call:
                w.result.cancel()
            raise
        finally:
            self._free_slots += 1
            self._running_items -= chunk_items([w.chunk for w in call])
            self._start_calls()

    def _waiting_items(self) -> int:
        return chunk_items([w.chunk for w in self._waiting])

    def _share(self, waiting: int) -> int:
        """Items one model call takes: its share of the items in the model's hands, waiting
        and in the calls running now, over the model slots (at most max_batch_size).

        A slot that took everything would leave the other slots the stragglers: one long call
        holding most requests beside short ones, and the requests in it all wait for the
        longest call. A slot that took only its share of what waits would leave requests
        behind for a slot busy with a long call. So the free slot evens the calls out: 13
        waiting, 2 idle slots: 7, then 6; 2 waiting beside a call of 6: both.
        """
        slots = self.cfg.batching.max_concurrent_batches
        share = -(-(waiting + self._running_items) // slots)
        return max(1, min(self.cfg.batching.max_batch_size, share))

    def _take(self, max_items: int) -> list[Waiting]:
        """The oldest waiting chunks, at most max_items items (at least one chunk)."""
        out: list[Waiting] = []
        n = 0
        while self._waiting and (not out or n + len(self._waiting[0].chunk.queries) <= max_items):
            w = self._waiting.popleft()
            n += len(w.chunk.queries)
            out.append(w)
        return out

    async def _run(self, call: list[Waiting], solo: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            results = await asyncio.to_thread(score_chunks, [w.chunk for w in call], solo)
        except Exception as e:  # score_chunks reports per chunk; this is the thread failing
            results = [e] * len(call)
        dt_ms = (time.perf_counter() - t0) * 1e3
        self.stats.record(len(call), chunk_items([w.chunk for w in call]), dt_ms)
        for w, r in zip(call, results):
            if not w.result.done():
                w.result.set_result(r)

    def tasks(self) -> dict[str, Any]:
        m = self.models
        return {
            "source": m.source,
            "loaded_at": m.loaded_at,
            "tasks": {
                t: {"model_version": str(s.model_version), "max_length": int(s.max_length)}
                for t, s in sorted(m.scorers.items())
            },
            "batching": self.cfg.batching.model_dump(),
            "limits": self.cfg.limits.model_dump(),
        }

    async def reload(self, only_if_moved: bool = False) -> dict[str, Any]:
        """Load the source again and swap the new models in; in-flight requests are unaffected.

        With `only_if_moved`, first ask the source which versions it points at and do nothing
        when they are the ones being served.
        """
        self.check_accepting()
        async with self._reload_lock:
            old = self.models
            if only_if_moved:
                state = await asyncio.to_thread(source_state, self.cfg)
                if state is None or state == old.state:
                    versions = old.versions()
                    return {"reloaded": False, "previous": versions, "model_versions": versions}
            new = await asyncio.to_thread(load_models, self.cfg)
            dropped = sorted(set(old.scorers) - set(new.scorers))
            if dropped:  # e.g. an alias deleted by mistake: keep serving those tasks
                raise ServiceError(
                    409,
                    f"reload refused: the source no longer has task(s) {dropped}; "
                    f"still serving {old.versions()}",
                )
            self.models = new
            logger.info("adrel serve: models %s -> %s", old.versions(), new.versions())
            return {
                "reloaded": True,
                "previous": old.versions(),
                "model_versions": new.versions(),
            }

    def start_watcher(self) -> None:
        """Check the source every reload_interval_s (when set) from the running event loop."""
        if self.cfg.reload_interval_s > 0 and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def stop_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            if self.draining:  # stopping: no new models
                return
            try:
                await self.reload(only_if_moved=True)
            except Exception as e:  # keep serving the current models; try again next time
                logger.warning("adrel serve: periodic model check failed: %s", e)


def _no_batch_limit_warning(record: logging.LogRecord) -> bool:
    """Drop Serve's hint that max_batch_size * max_concurrent_batches exceeds
    max_ongoing_requests: Serve's batch concurrency is deliberately open here (the model slots
    bound it), and max_ongoing_requests >= max_batch_size * slots is checked in ServeConfig."""
    return "max_concurrent_batches` (" not in record.getMessage()


def score_chunks(chunks: Sequence[Chunk], solo: bool = False) -> list[np.ndarray | Exception]:
    """Score every chunk, one model call per Scorer; a failing Scorer fails only its chunks.
    solo: the call runs alone (the Scorers' solo sessions, where they have one)."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        groups.setdefault(id(c.scorer), []).append(i)
    out: list[np.ndarray | Exception] = [None] * len(chunks)  # type: ignore[list-item]
    for idx in groups.values():
        part = [chunks[i] for i in idx]
        scorer = part[0].scorer
        queries = [q for c in part for q in c.queries]
        titles = [t for c in part for t in c.titles]
        descs = None
        if any(c.descriptions is not None for c in part):
            descs = [d for c in part for d in (c.descriptions or [None] * len(c.queries))]
        try:
            scores = np.asarray(scorer.score(queries, titles, descs, solo=solo), dtype=np.float32)
        except Exception as e:
            logger.exception(
                "adrel serve: scoring %d items for task %s failed", len(queries), scorer.task
            )
            for i in idx:
                out[i] = RuntimeError(f"scoring failed for task {scorer.task!r}: {e}")
            continue
        bounds = np.cumsum([len(c.queries) for c in part])[:-1]
        for i, s in zip(idx, np.split(scores, bounds)):
            out[i] = s
    return out


# ---- HTTP ---------------------------------------------------------------------------------


async def require_json(request: Request) -> None:
    """415 unless the body is declared JSON (checked before the body is validated).

    async on purpose: FastAPI runs a plain-function dependency in its thread pool, a thread
    hand-off on every request.
    """
    ctype = request.headers.get("content-type", "")
    mime = ctype.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        raise HTTPException(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")


def field_path(loc: Sequence[Any]) -> str:
    """("body", "items", 0, "ad_title") -> "items[0].ad_title"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def describe_error(e: Mapping[str, Any]) -> dict[str, Any]:
    """A validation error as {"field", "msg", "type"}, the field as a path into the body."""
    if e.get("type") == "json_invalid":  # loc is ("body", character position)
        pos = e.get("loc", (None, None))[-1]
        reason = (e.get("ctx") or {}).get("error", "")
        return {
            "field": "body",
            "msg": f"invalid JSON at character {pos}: {reason}",
            "type": "json_invalid",
        }
    return {"field": field_path(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type")}


class InFlightCounter:
    """ASGI middleware: counts the HTTP requests being handled, until their answer is sent,
    so that a draining replica knows when it has answered everything it admitted."""

    def __init__(self, app: Any, service: ScoringService):
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.service.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.service.in_flight -= 1


class BodySizeGuard:
    """ASGI middleware: 413 naming the limit for a body larger than max_body_bytes.

    A declared Content-Length is checked before anything is read; a body without one is
    buffered up to the limit and then handed on (it never grows past the limit in memory).
    """

    def __init__(self, app: Any, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None:
            size = int(length) if length.isdigit() else self.max_body_bytes + 1
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send, f"request body is {size} bytes")
                return
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send, "request body is larger")
                return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, what: str) -> None:
        detail = f"{what}; the limit is {self.max_body_bytes} bytes (limits.max_body_bytes)"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def build_api(service: ScoringService) -> FastAPI:
    """The FastAPI app of one replica, bound to its ScoringService."""
    api = FastAPI(
        title="adrel scoring",
        version=API_VERSION,
        description="Query–ad relevance probabilities from merged per-task MTL-LoRA models.",
    )

    api.add_middleware(BodySizeGuard, max_body_bytes=service.cfg.limits.max_body_bytes)
    api.add_middleware(InFlightCounter, service=service)  # added last: the outermost

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [describe_error(e) for e in exc.errors()]
        summary = "; ".join(f"{e['field']}: {e['msg']}" for e in errors[:5])
        return JSONResponse({"detail": summary, "errors": errors}, status_code=422)

    @api.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Any:
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_UNREADABLE:
            # JSON that json.loads cannot take although it is well formed (invalid UTF-8,
            # nesting too deep, an integer too long): a malformed body like any other.
            cause = exc.__cause__
            why = f": {type(cause).__name__}: {cause}"[:300] if cause else ""
            error = {"field": "body", "msg": f"the body cannot be read as JSON{why}",
                     "type": "json_invalid"}  # fmt: skip
            return JSONResponse({"detail": f"body: {error['msg']}", "errors": [error]}, 422)
        return await http_exception_handler(request, exc)

    @api.exception_handler(ServiceError)
    async def _refused(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @api.exception_handler(Exception)
    async def _failed(_: Request, exc: Exception) -> JSONResponse:
        # Logged where it happened; the replica keeps serving.
        return JSONResponse({"detail": f"{type(exc).__name__}: {exc}"}, status_code=500)

    @api.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=_ERRORS,
        dependencies=[Depends(require_json)],
        summary="Score query–ad pairs with one task's model",
    )
    async def score(body: ScoreRequest) -> dict[str, Any]:
        return await service.score(body)

    @api.get("/v1/tasks", response_model=TasksResponse, summary="Tasks and model versions")
    async def tasks() -> dict[str, Any]:
        return service.tasks()

    @api.get("/v1/stats", summary="Batch sizes seen by this replica")
    async def stats() -> dict[str, Any]:
        return {"replica": _replica_id(), "draining": service.draining, **service.stats.snapshot()}

    @api.get(
        "/healthz",
        summary="Liveness; 503 while the replica drains",
        responses={503: {"description": "Draining: take this replica out of rotation."}},
    )
    async def healthz() -> Any:
        tasks = sorted(service.models.scorers)
        if service.draining:
            return JSONResponse({"status": "draining", "tasks": tasks}, status_code=503)
        return {"status": "ok", "tasks": tasks}

    @api.post(
        "/v1/reload",
        response_model=ReloadResponse,
        responses={
            409: {"model": ErrorResponse, "description": "The new source lacks a served task."},
            502: {"model": ErrorResponse, "description": "The source failed to load."},
        },
        summary="Load the model source again and swap the new models in",
    )
    async def reload(request: Request) -> dict[str, Any]:
        body = (await request.body()).strip()
        if body not in (b"", b"{}"):
            # Nothing here chooses what is loaded: a client sending a source or a version
            # must not take the answer for a switch to it.
            raise ServiceError(
                422,
                f"POST /v1/reload takes no body: it loads the source the service was started "
                f"with ({service.cfg.model}) again; got {body[:80]!r}",
            )
        try:
            done = await service.reload()
        except ServiceError:
            raise
        except Exception as e:
            versions = service.models.versions()
            raise ServiceError(
                502, f"reload failed, still serving {versions}: {type(e).__name__}: {e}"
            ) from e
        me = _replica_id()
        own = {"reloaded": done["reloaded"], "model_versions": done["model_versions"]}
        replicas: dict[str, Any] = {}
        if service.peers is not None:
            try:
                replicas = await service.peers.reload_all()
            except ray.exceptions.RayError as e:  # the app's AppControl is gone
                logger.warning("adrel serve: reload not passed on to the other replicas: %s", e)
        replicas[me] = own  # this replica's own reload, whatever its follower reported
        expected = service.peers.replicas if service.peers else 1
        return {"replica": me, **done, "replicas": replicas, "missing": expected - len(replicas)}

    return api


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica
        return f"pid-{os.getpid()}"


# ---- the Serve deployment -----------------------------------------------------------------


CONTROL_NAMESPACE = "adrel-serve"
RELOAD_WAIT_S = 120.0  # how long POST /v1/reload waits for the other replicas to follow


def control_name(app_name: str) -> str:
    return f"control-{app_name}"


@ray.remote(num_cpus=0)
class AppControl:
    """What one app's replicas do together, a named actor created by `start`: their replicas
    wait on it for a reload that another replica was asked for, and for the drain before they
    are stopped; each reports back when it has done either."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._reload_generation = 0
        self._reloads: dict[str, tuple[int, dict[str, Any]]] = {}  # replica: (generation, report)
        self._draining = False
        self._drained: set[str] = set()

    async def reset(self) -> None:
        """A new deployment of the app: nothing drains, no reload is pending."""
        async with self._changed:
            self._draining = False
            self._drained = set()
            self._reloads = {}

    # -- reloads: one replica is asked, every replica follows ----------------------------------

    async def reload_generation(self) -> int:
        return self._reload_generation

    async def announce_reload(self) -> int:
        async with self._changed:
            self._reload_generation += 1
            self._changed.notify_all()
            return self._reload_generation

    async def wait_reload(self, seen: int) -> int:
        """The newest reload generation, once it is past `seen`."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._reload_generation > seen)
            return self._reload_generation

    async def report_reloaded(self, replica: str, generation: int, report: dict) -> None:
        async with self._changed:
            self._reloads[replica] = (generation, report)
            self._changed.notify_all()

    async def wait_reloaded(
        self, generation: int, replicas: int, timeout_s: float
    ) -> dict[str, dict[str, Any]]:
        """Each replica's report on `generation` (or a later one): once `replicas` have
        reported, or those that did after timeout_s."""

        def done() -> dict[str, dict[str, Any]]:
            return {r: rep for r, (g, rep) in self._reloads.items() if g >= generation}

        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: len(done()) >= replicas), timeout_s
                )
            return done()

    # -- the drain before a stop --------------------------------------------------------------

    async def wait_drain(self) -> bool:
        async with self._changed:
            await self._changed.wait_for(lambda: self._draining)
            return True

    async def drain(self) -> None:
        async with self._changed:
            self._draining = True
            self._changed.notify_all()

    async def report_drained(self, replica: str) -> None:
        async with self._changed:
            self._drained.add(replica)
            self._changed.notify_all()

    async def wait_drained(self, replicas: int, timeout_s: float) -> int:
        """How many replicas drained, once `replicas` have or after timeout_s."""
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: len(self._drained) >= replicas), timeout_s
                )
            return len(self._drained)


def create_control(app_name: str) -> Any:
    """The app's AppControl, created if missing and reset for a new deployment.

    Detached, like the Serve app itself: on a shared cluster a SIGKILLed `adrel serve` leaves
    the app serving, and its replicas go on following each other's reloads. `remove_control`
    ends it once the app is deleted; on a cluster `adrel serve` started, it goes with Ray.
    """
    control = AppControl.options(
        name=control_name(app_name),
        namespace=CONTROL_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
    ).remote()
    ray.get(control.reset.remote())
    return control


def remove_control(app_name: str) -> bool:
    """End the app's AppControl (after its app was deleted); False when there was none."""
    try:
        control = ray.get_actor(control_name(app_name), namespace=CONTROL_NAMESPACE)
    except ValueError:
        return False
    ray.kill(control)
    return True


def drain(cfg: ServeConfig, timeout_s: float | None = None) -> int:
    """Drain cfg's app before serve.shutdown / serve.delete (see the module docstring): tell
    its replicas, then wait until each refuses new requests and has answered the ones it
    admitted, at most timeout_s (default drain_s + graceful_shutdown_timeout_s). Returns how
    many replicas drained (0 when the app has no AppControl: it was not started by `start`).
    """
    if timeout_s is None:
        timeout_s = cfg.drain_s + cfg.graceful_shutdown_timeout_s
    try:
        control = ray.get_actor(control_name(cfg.app_name), namespace=CONTROL_NAMESPACE)
        ray.get(control.drain.remote(), timeout=10)
        return ray.get(control.wait_drained.remote(cfg.replicas, timeout_s), timeout=timeout_s + 10)
    except (ValueError, ray.exceptions.RayError) as e:
        logger.warning("adrel serve: replicas not drained: %s", e)
        return 0


class Peers:
    """A replica's side of its app's AppControl."""

    def __init__(self, control: Any, replica: str, replicas: int):
        self.control = control
        self.replica = replica
        self.replicas = replicas

    async def reload_all(self) -> dict[str, dict[str, Any]]:
        """Ask every replica to follow a reload this one made; their reports."""
        generation = await self.control.announce_reload.remote()
        return await self.control.wait_reloaded.remote(generation, self.replicas, RELOAD_WAIT_S)

    async def follow(self, service: ScoringService) -> None:
        """Until the AppControl goes (removed with its app): reload when another replica
        did, and drain when told to."""
        try:
            await asyncio.gather(self._follow_reloads(service), self._follow_drain(service))
        except ray.exceptions.RayError:  # the AppControl is gone: nothing to follow
            return

    async def _follow_reloads(self, service: ScoringService) -> None:
        seen = await self.control.reload_generation.remote()
        while not service.draining:
            seen = await self.control.wait_reload.remote(seen)
            try:  # the replica that was asked has reloaded already: a no-op there
                done = await service.reload(only_if_moved=True)
                report = {"reloaded": done["reloaded"], "model_versions": done["model_versions"]}
            except Exception as e:
                message = e.message if isinstance(e, ServiceError) else f"{type(e).__name__}: {e}"
                report = {"error": message, "model_versions": service.models.versions()}
            await self.control.report_reloaded.remote(self.replica, seen, report)

    async def _follow_drain(self, service: ScoringService) -> None:
        await self.control.wait_drain.remote()
        service.begin_drain()
        await service.drained()
        await self.control.report_drained.remote(self.replica)


@serve.deployment(name="scorer")
@serve.ingress()
class ScoringDeployment:
    """One replica: the models of every task, a batcher and the HTTP routes."""

    async def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServeConfig.model_validate(config)
        if cfg.tracking_uri:  # models:/ downloads read the registry from the environment
            os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking_uri
        models = await asyncio.to_thread(load_models, cfg)
        self.service = ScoringService(cfg, models)
        self.service.start_watcher()
        self._follower: asyncio.Task | None = None
        try:
            control = await asyncio.to_thread(
                ray.get_actor, control_name(cfg.app_name), CONTROL_NAMESPACE
            )
        except ValueError:  # deployed without `start`: each replica on its own
            logger.info("adrel serve: no AppControl: reloads are per replica, no drain")
        else:
            self.service.peers = Peers(control, _replica_id(), cfg.replicas)
            self._follower = asyncio.get_running_loop().create_task(
                self.service.peers.follow(self.service)
            )
        # Everything loaded so far (Ray, Serve, FastAPI, the models) lives as long as the
        # replica: move it out of the collector's sight, so that a full collection under load
        # walks only what requests allocate (a long pause in the tail latency otherwise).
        gc.collect()
        gc.freeze()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.service)

    async def check_health(self) -> None:
        if not self.service.models.scorers:
            raise RuntimeError("no models loaded")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.stop_watcher()
        follower = getattr(self, "_follower", None)
        if follower is not None:
            follower.cancel()


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`: replicas, concurrency and resources set from it."""
    return ScoringDeployment.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus_per_replica},
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
        # How often a stopping replica checks for requests still in flight (Serve's default,
        # 2 s, would hold a drained replica up to 2 s longer).
        graceful_shutdown_wait_loop_s=0.25,
        logging_config={"enable_access_log": cfg.access_log},
    ).bind(cfg.model_dump(mode="json"))


@dataclass(frozen=True)
class Endpoints:
    """Where a started service answers.

    url: where to send requests (the first replica with direct ingress, else Serve's proxy).
    proxy_url: Serve's HTTP proxy, which spreads requests over every replica.
    replica_urls: direct ingress only: one per replica that answered its health check.
    """

    url: str
    proxy_url: str
    replica_urls: tuple[str, ...] = ()


def start(cfg: ServeConfig, wait_s: float = 60.0) -> Endpoints:
    """Start Serve's HTTP proxy, deploy the app and return where it answers.

    Needs a connected Ray (jobs.runtime.ensure_ray) whose processes started with
    cfg.ray_env() for direct ingress. Blocks until every replica is up; with direct ingress,
    until each answers on its own port (at most wait_s; RuntimeError when none does).
    """
    check_source(cfg)
    for attempt in range(3):
        try:
            serve.start(
                http_options={"host": cfg.host, "port": cfg.serve_proxy_port},
                logging_config={"enable_access_log": cfg.access_log},
            )
            break
        except ray.exceptions.ActorDiedError as e:
            # Serve killed a proxy that was slow to report ready and starts another; the
            # controller is up, so starting again connects to it.
            if attempt == 2:
                raise RuntimeError(f"Serve's HTTP proxy did not start: {e}") from None
            logger.warning("adrel serve: Serve's proxy restarted while starting; again")
    create_control(cfg.app_name)  # before the replicas: each looks it up once
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    deadline = time.monotonic() + wait_s
    proxy_url = base_url(cfg.host, cfg.serve_proxy_port)
    while not answers(cfg.host, cfg.serve_proxy_port) and time.monotonic() < deadline:
        time.sleep(0.25)  # the proxy learns the app's route a moment after it is up
    if cfg.ingress == "proxy":
        return Endpoints(proxy_url, proxy_url)
    replicas = replica_urls(cfg, max(0.0, deadline - time.monotonic()))
    if not replicas:
        ports = cfg.replica_ports
        raise RuntimeError(
            f"no replica answers on ports {ports.start}-{ports.stop - 1}: direct ingress needs "
            "the Ray cluster's Serve processes started with "
            + ", ".join(f"{k}={v}" for k, v in cfg.ray_env().items())
            + " (adrel serve sets this for a cluster it starts); or use --ingress proxy"
        )
    return Endpoints(replicas[0], proxy_url, tuple(replicas))


def replica_urls(cfg: ServeConfig, wait_s: float = 60.0) -> list[str]:
    """Base URLs of the replicas answering GET /healthz on cfg.replica_ports, lowest port
    first; waits up to wait_s for cfg.replicas of them."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [base_url(cfg.host, p) for p in cfg.replica_ports if answers(cfg.host, p)]
        if len(found) >= cfg.replicas or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def answers(host: str, port: int, path: str = "/healthz") -> bool:
    """True when GET path on host:port answers 200 (a wildcard host is asked on loopback)."""
    import http.client

    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
