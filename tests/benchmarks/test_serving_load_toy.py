"""benchmarks/bench_serving_load.py end to end at toy size: a real local Ray Serve with its three
apps on loopback, the asyncio load generator, the bare Scorer, and the one-line JSON summary."""

from __future__ import annotations

import math
import re

import pytest

from tests.benchmarks import run_benchmark

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("client", ["async", "threads"])
def test_load_benchmark_runs_and_reports_every_figure(make_tiny_export, client):
    export = make_tiny_export(["search", "shopping"], "bench-serving")
    args = ["--model", str(export), "--requests", "24", "--rounds", "1", "--time-limit", "10"]
    out, stdout = run_benchmark("bench_serving_load.py", *args, "--client", client, timeout=600)
    assert out["errors"] == 0 and out["client"] == client
    for key in ("p50_ms_c1", "p99_ms_c1", "p99_ms_c16_batched", "rps_c16_batched",
                "rps_c16_unbatched", "batching_gain", "overhead_ms_c1",
                "model_batching_gain_bound"):  # fmt: skip
        assert math.isfinite(out[key]), (key, out)
        assert out[key] > 0 or key == "overhead_ms_c1", (key, out)
    assert out["p99_ms_c1"] >= out["p50_ms_c1"] > out["bare_scorer_p50_ms"] > 0
    assert 0 < out["client_cpu_ms_per_request_c16"] < 50
    assert 1 <= out["mean_batch_items_c16"] <= out["batch_size"]
    # The per-phase split: the time inside the handler is part of the whole latency.
    phases = re.findall(r"mean latency ([\d.]+) ms, in the handler ([\d.]+) ms", stdout)
    assert len(phases) == 4, stdout[-2000:]  # batched/unbatched at c1 and c16
    assert all(0 < float(inside) <= float(whole) for whole, inside in phases), phases
    # Inside the batched handler at c16; a take saw at least the items it took.
    handler, queue = out["handler_ms_c16_batched"], out["queue_ms_c16_batched"]
    model, batcher = out["model_call_ms_c16_batched"], out["batcher_ms_c16_batched"]
    assert queue >= 0 and model > 0 and batcher >= 0, out
    # Per request, the batcher, the wait for a slot and its own call are parts of its time
    # in the handler, so their means are too.
    assert batcher + queue + out["own_call_ms_c16_batched"] <= handler * 1.01, out
    assert out["waiting_at_take_c16_batched"] >= out["mean_batch_items_c16"], out
