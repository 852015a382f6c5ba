"""`adrel serve`: argument checks (no Ray needed) and one real run stopped by SIGTERM under
load."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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
    for named in (
        "--port (port):",
        "--max-batch-size (batching.max_batch_size):",
        "--batch-wait-ms (batching.batch_wait_ms):",
        "--replicas (replicas):",
        "--tasks (tasks):",
    ):
        assert named in err, (named, err)
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


@dataclass
class Sent:
    sent: float  # time.monotonic() when sent
    outcome: int | str  # the status code, or the transport error's class name
    scores: list[float] | None = None
    detail: str = ""
    connection: str = ""


class Load:
    """Clients posting one item again and again, each to one of urls, until stopped or
    refused (a 503 or a transport error ends a client)."""

    def __init__(self, urls: list[str], item: dict, clients: int):
        self.records: list[Sent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        body = {"task": "search", "items": [item]}
        self._threads = [
            threading.Thread(target=self._client, args=(urls[k % len(urls)], body), daemon=True)
            for k in range(clients)
        ]
        for t in self._threads:
            t.start()

    def _client(self, url: str, body: dict) -> None:
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post(f"{url}/v1/score", json=body)
                except httpx.TransportError as e:
                    rec = Sent(sent, type(e).__name__)
                else:
                    j = r.json()
                    rec = Sent(sent, r.status_code, j.get("scores"), str(j.get("detail", "")))
                    rec.connection = r.headers.get("connection", "")
                with self._lock:
                    self.records.append(rec)
                if rec.outcome != 200:
                    return

    def wait_for_answers(self, per_client: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len([r for r in self.records if r.outcome == 200]) < per_client * len(self._threads):
            assert time.monotonic() < deadline, self.records[-5:]
            time.sleep(0.05)

    def stop(self) -> list[Sent]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        return list(self.records)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("ingress", ["direct", "proxy"])
def test_serves_reloads_everywhere_and_drains_on_sigterm(export_dir, ingress, tmp_path):
    """`adrel serve` as run in production: replicas answer, a reload asked of one replica
    reaches every replica, and SIGTERM under load drains them all and exits 0."""
    from serving.scorer import load_scorers
    from tests.serving.helpers import derive_export

    source = tmp_path / "source"  # the served directory: re-exported in place below
    shutil.copytree(export_dir, source)
    new = derive_export(export_dir, tmp_path / "new", bias_shift=1.5)
    port = free_loopback_port(5)  # direct: 2 replicas, 2 spare ports, Serve's proxy
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs", "serve", "--model", str(source), "--port", str(port)]
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
        # A re-export lands in the served directory; one replica is asked to reload, and every
        # replica is on the new model when it answers.
        old_version = httpx.get(f"{replicas[0]}/v1/tasks").json()["tasks"]["search"]
        shutil.copytree(new / "search", source / "search", dirs_exist_ok=True)
        new_scorer = load_scorers(new)["search"]
        new_version = str(new_scorer.model_version)
        assert new_version != old_version["model_version"]
        r = httpx.post(f"{urls[-1]}/v1/reload", timeout=180)  # the proxy's replica, direct
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["reloaded"] and body["missing"] == 0, body
        assert sorted(body["replicas"]) == sorted(s["replica"] for s in stats), body
        for rep in body["replicas"].values():
            assert rep["model_versions"] == {"search": new_version} and not rep.get("error"), body
        want = new_scorer.score([item["query"]], [item["ad_title"]], [item["ad_description"]])
        for u in replicas:  # no wait: each replica reloaded before the reload answered
            r = httpx.post(f"{u}/v1/score", json={"task": "search", "items": [item]}, timeout=30)
            assert r.json()["model_version"] == new_version, (u, r.text)
            np.testing.assert_allclose(r.json()["scores"], want, atol=1e-6)
        # Stopped under load: clients that keep sending (each stops at its first 503, as a
        # client that moves on to another replica does).
        load = Load(replicas, item, clients=4)
        load.wait_for_answers(3)
        t_sigterm = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        shutdown_s = time.monotonic() - t_sigterm
        records = load.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "shutting down" in out and "adrel serve: stopped" in out, out
    # Every replica answered what it had admitted, then Serve stopped it at once: not after its
    # 20-s grace period, which kills the replica with whatever it still runs.
    assert f"{len(replicas)} of {len(replicas)} replica(s) drained" in out, out
    assert "force-killing" not in out and shutdown_s < 15, (shutdown_s, out[-3000:])
    # Each request got its scores, or a 503 that says why (one still on its way to a replica
    # when the drain began is refused, not cut off), or found nothing listening any more.
    assert [r.outcome for r in records if r.sent < t_sigterm].count(200) >= 12
    for r in records:
        if r.outcome == 200:
            np.testing.assert_allclose(r.scores, want, atol=1e-6)
        elif r.outcome == 503:  # refused once the replica drained: says so, closes
            assert "shutting down" in r.detail and r.connection == "close", r
        else:  # nothing listens any more: a new connection is refused, nothing is cut off
            assert r.outcome == "ConnectError" and r.sent > t_sigterm, r
    assert any(r.outcome == 503 for r in records), records
    if ingress == "direct":
        want = f"replicas at {urls[0]}, {urls[1]}; Serve's proxy (over every replica) at {urls[2]}"
        assert want in out, out
    for u in urls:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{u}/healthz", timeout=2)
