"""Shared fixtures: offline env, a tiny random encoder, a sqlite MLflow in tmp, a local Ray."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from jobs.runtime import set_env_defaults

set_env_defaults()

# This session's model cache (pipeline.model_uri): every test's sqlite store caches its own
# downloads, so the tests get a folder of their own, removed at the end, instead of adding a
# few gigabytes a run to the machine's cache. Set before any Ray cluster starts: workers,
# replicas and CLI subprocesses inherit it.
_MODEL_CACHE = tempfile.mkdtemp(prefix="adrel-test-model-cache-")
os.environ["ADREL_MODEL_CACHE"] = _MODEL_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_MODEL_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A 2-layer, hidden-32 random BERT with the MiniLM tokenizer (a loadable folder)."""
    from models.tiny import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def make_tiny_export(tmp_path_factory, tiny_encoder_dir):
    """make(tasks, name): an ONNX export of a tiny checkpoint for `tasks` whose adapters and
    heads are non-zero (seeded: the same tasks give the same graphs)."""

    def make(tasks: list[str], name: str = "export"):
        import torch

        from features.tasks import TaskRegistry
        from models.checkpoint import build_model, save_checkpoint
        from models.config import AdapterConfig
        from pipeline.export import export_checkpoint

        tmp = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        cfg = AdapterConfig(num_tasks=len(tasks))
        model = build_model(str(tiny_encoder_dir), cfg, TaskRegistry(tasks))
        with torch.no_grad():
            for p in model.trainable_state().values():
                p.add_(torch.randn_like(p) * 0.5)  # non-zero B, Λ, w and heads
        ckpt = save_checkpoint(model, tmp / "ckpt", max_length=32)
        return export_checkpoint(ckpt, tmp / "export").out_dir

    return make


@pytest.fixture(scope="session")
def minilm_dir():
    from models.encoder import DEFAULT_ENCODER, resolve_encoder

    return resolve_encoder(DEFAULT_ENCODER)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A real MLflow tracking store on a sqlite file in tmp (set as MLFLOW_TRACKING_URI)."""
    uri = "sqlite:///" + str((tmp_path / "mlflow.db").resolve())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def _ray_owner():
    state = {"started": False}
    yield state
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_owner):
    """A real local Ray cluster (2 CPUs, loopback), shared across tests, shut down at the end.

    Tests that need their own cluster (e.g. ray.cluster_utils.Cluster) call ray.shutdown()
    first and shut theirs down when done; the next user of this fixture starts a fresh one.
    """
    import ray

    from jobs.runtime import ensure_ray

    if not ray.is_initialized():
        ensure_ray(num_cpus=int(os.environ.get("ADREL_TEST_RAY_CPUS", "2")))
    yield ray
