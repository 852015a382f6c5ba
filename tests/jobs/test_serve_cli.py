"""`adrel serve`: argument checks (no Ray needed) and one real run stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from jobs.cli import build_parser, main
from jobs.runtime import free_loopback_port

REPO = Path(__file__).resolve().parents[2]


def test_refuses_a_non_loopback_host_without_allow_remote(tmp_path, capsys):
    for host in ("0.0.0.0", "192.0.2.7", "::", "example.com"):
        rc = main(["serve", "--model", str(tmp_path), "--host", host])
        err = capsys.readouterr().err
        assert rc == 2, host
        assert "not a loopback address" in err and "--allow-remote" in err, err


def test_loopback_by_default_and_remote_when_allowed(tmp_path):
    from jobs.serve import build_config

    parser = build_parser()
    cfg = build_config(parser.parse_args(["serve", "--model", str(tmp_path)]))
    assert (cfg.host, cfg.port, cfg.allow_remote) == ("127.0.0.1", 8000, False)
    for host in ("localhost", "127.0.0.2", "::1"):
        assert (
            build_config(parser.parse_args(["serve", "--model", "m", "--host", host])).host == host
        )
    args = ["serve", "--model", "m", "--host", "0.0.0.0", "--allow-remote", "--replicas", "3"]
    args += ["--max-batch-size", "32", "--batch-wait-ms", "5", "--tasks", "a", "b"]
    cfg = build_config(parser.parse_args(args))
    assert (cfg.host, cfg.replicas, cfg.tasks) == ("0.0.0.0", 3, ["a", "b"])
    assert (cfg.batching.max_batch_size, cfg.batching.batch_wait_ms) == (32, 5.0)
    assert cfg.ongoing_requests >= 32  # a full batch can always form
    assert cfg.solo_session is True
    assert build_config(parser.parse_args([*args, "--no-solo-session"])).solo_session is False


def test_reports_every_bad_setting_at_once(tmp_path, capsys):
    argv = ["serve", "--model", str(tmp_path), "--port", "0", "--max-batch-size", "0"]
    argv += ["--batch-wait-ms", "-1", "--replicas", "0", "--tasks", "../x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for field in ("port", "batching.max_batch_size", "batching.batch_wait_ms", "replicas", "tasks"):
        assert field in err, (field, err)
    argv = ["serve", "--model", str(tmp_path), "--max-batch-size", "16"]
    assert main([*argv, "--max-ongoing-requests", "4"]) == 2
    assert "max_ongoing_requests" in capsys.readouterr().err


def test_refuses_a_missing_model_before_starting_ray(tmp_path, capsys):
    import ray

    was_running = ray.is_initialized()
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert ray.is_initialized() == was_running


@pytest.fixture(scope="module")
def export_dir(make_tiny_export):
    return make_tiny_export(["search"], "serve-cli")


def test_busy_port_is_refused(export_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--model", str(export_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("ingress", ["direct", "proxy"])
def test_serves_until_sigterm_then_shuts_down_cleanly(export_dir, ingress):
    from serving.scorer import load_scorers

    port = free_loopback_port(5)  # direct: 2 replicas, 2 spare ports, Serve's proxy
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs", "serve", "--model", str(export_dir), "--port", str(port)]
    cmd += ["--num-cpus", "1", "--num-cpus-per-replica", "0", "--intra-op-threads", "1"]
    cmd += ["--ingress", ingress]
    # Direct: each replica on a port of its own from [port, port + 4) (a replica whose port
    # another process holds moves to a spare one), and Serve's proxy over both on port + 4.
    candidates = [f"http://127.0.0.1:{p}" for p in range(port, port + 4)]
    proxy = [f"http://127.0.0.1:{port + 4}"]
    if ingress == "direct":
        cmd += ["--replicas", "2"]
    else:  # the proxy on --port
        candidates, proxy = candidates[:1], []
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            # where the service answers: both replicas (or the proxy), then the proxy
            urls = [u for u in candidates if _healthy(u)]
            if len(urls) == (2 if ingress == "direct" else 1) and all(map(_healthy, proxy)):
                urls += proxy
                break
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"service did not come up:\n{proc.communicate()[0][-4000:]}")
            time.sleep(1)
        item = {"query": "red running shoes", "ad_title": "Trail shoes", "ad_description": "light"}
        want = load_scorers(export_dir)["search"].score(
            [item["query"]], [item["ad_title"]], [item["ad_description"]]
        )
        for u in urls:
            r = httpx.post(f"{u}/v1/score", json={"task": "search", "items": [item]}, timeout=30)
            assert r.status_code == 200, (u, r.text)
            np.testing.assert_allclose(r.json()["scores"], want, atol=1e-6)
        # One request at a time: each found its replica idle and skipped the batch queue
        # (the default batch wait is 0), one model call each.
        replicas = urls[:2] if ingress == "direct" else urls[:1]
        stats = [httpx.get(f"{u}/v1/stats", timeout=10).json() for u in replicas]
        assert len({s["replica"] for s in stats}) == len(replicas)
        assert sum(s["idle_requests"] for s in stats) == len(urls), stats
        assert sum(s["batches"] for s in stats) == sum(s["requests"] for s in stats) == len(urls)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "shutting down" in out and "adrel serve: stopped" in out, out
    if ingress == "direct":
        want = f"replicas at {urls[0]}, {urls[1]}; Serve's proxy (over every replica) at {urls[2]}"
        assert want in out, out
    for u in urls:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{u}/healthz", timeout=2)
