"""MLflow registry on sqlite in tmp: register → alias → load by alias; promote is recorded."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import model_uri as mu
from pipeline.registry import (
    RegistryError,
    list_models,
    promote,
    promotion_history,
    register_checkpoint,
    register_export,
)
from serving.scorer import Scorer, ScorerError, load_scorers
from tests.pipeline.test_export import (
    TASKS,
    make_checkpoint,
    shared_export,
    text_rows,
    torch_logits,
)


@pytest.fixture(scope="module")
def exported(tiny_encoder_dir, tmp_path_factory):
    return shared_export(tiny_encoder_dir, tmp_path_factory)


@pytest.fixture
def client(mlflow_uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADREL_MODEL_CACHE", str(tmp_path / "model-cache"))


def _rows():
    return text_rows(11, seed=4)


def test_register_alias_load_round_trip(exported, client, cache, mlflow_uri):
    ckpt, out = exported
    versions = register_export(out)
    assert {t: (v.name, v.version) for t, v in versions.items()} == {
        t: (f"adrel-{t}", "1") for t in TASKS
    }
    mv = client.get_model_version_by_alias("adrel-a", "challenger")
    assert str(mv.version) == "1"
    assert mv.tags["adrel.task"] == "a" and mv.tags["adrel.parity.fp32.pass"] == "true"
    assert float(mv.tags["adrel.parity.fp32.max_abs_diff"]) <= 1e-4
    assert mv.tags["adrel.source_model"] == str(ckpt)
    assert json.loads(mv.tags["adrel.metrics"]) == {"auc": 0.81}
    assert client.get_registered_model("adrel-a").tags["adrel.kind"] == "task"

    with pytest.raises(mu.ModelURIError, match="champion"):
        load_scorers("models:/adrel-a@champion")  # nothing promoted yet
    for t in TASKS:
        promote(t, 1, reason="first release", actor="tester")

    rows = _rows()
    local = Scorer(out / "a", providers="cpu")
    want = local.logits(rows["query"], rows["ad_title"], rows["ad_description"])
    (task, scorer), = load_scorers("models:/adrel-a@champion", providers="cpu").items()  # fmt: skip
    assert task == "a" and scorer.model_version == "1"
    assert scorer.meta["registered_name"] == "adrel-a"
    got = scorer.logits(rows["query"], rows["ad_title"], rows["ad_description"])
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, torch_logits(ckpt, "a", rows), atol=1e-4)

    # a prefix with an alias: every task model carrying it; a subset by --tasks
    every = load_scorers("models:/adrel@champion", providers="cpu")
    assert sorted(every) == list(TASKS) and all(s.model_version == "1" for s in every.values())
    assert list(load_scorers("models:/adrel@champion", tasks=["b"])) == ["b"]
    assert list(load_scorers("models:/adrel-b/1")) == ["b"]
    assert list(load_scorers("models:/adrel-c/latest")) == ["c"]
    with pytest.raises(ScorerError, match="alias 'nope'"):
        load_scorers("models:/adrel@nope")

    res = mu.resolve_model("models:/adrel-a@champion")
    assert (res.name, res.version, res.alias) == ("adrel-a", "1", "champion")
    assert res.run_id == versions["a"].run_id
    assert (mu.find_payload(res.path, "meta.json") / "model.onnx").is_file()

    # the pyfunc (what `mlflow models serve` and generic MLflow tooling load)
    import mlflow.pyfunc

    pyf = mlflow.pyfunc.load_model("models:/adrel-a@champion")
    df = pd.DataFrame(rows)
    pred = pyf.predict(df)
    np.testing.assert_allclose(pred["logit"].to_numpy(), want, atol=1e-5)
    np.testing.assert_allclose(pred["score"].to_numpy(), 1 / (1 + np.exp(-want)), atol=1e-5)
    assert pyf.metadata.signature.inputs.input_names() == ["query", "ad_title", "ad_description"]


def test_promote_moves_champion_and_records_it(exported, client, cache):
    _, out = exported
    register_export(out, tasks=["a"])
    register_export(out, tasks=["a"])
    assert str(client.get_model_version_by_alias("adrel-a", "challenger").version) == "2"
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias("adrel-a", "champion")  # never moved implicitly

    first = promote("a", "1", reason="baseline", actor="alice")
    assert (first.from_version, first.to_version) == (None, "1")
    second = promote("a", 2, reason="better AUC on dev", actor="bob")
    assert (second.from_version, second.to_version, second.actor) == ("1", "2", "bob")
    assert str(client.get_model_version_by_alias("adrel-a", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("adrel-a", "challenger").version) == "2"

    v2 = client.get_model_version("adrel-a", "2")
    assert v2.tags["adrel.promoted_by"] == "bob"
    record = json.loads(v2.tags["adrel.promotion"])
    assert record["from_version"] == "1" and record["reason"] == "better AUC on dev"
    assert "adrel.demoted_at" in client.get_model_version("adrel-a", "1").tags
    last = json.loads(client.get_registered_model("adrel-a").tags["adrel.last_promotion"])
    assert last["to_version"] == "2"

    hist = promotion_history("a")
    assert [(h["from_version"], h["to_version"], h["actor"]) for h in hist] == [
        (None, "1", "alice"),
        ("1", "2", "bob"),
    ]
    local = client.download_artifacts(second.record_run_id, "promotion.json")
    with open(local) as f:
        logged = json.load(f)
    assert logged["from_version"] == "1" and logged["to_version"] == "2"
    assert logged["at"] == second.at and logged["actor"] == "bob"

    with pytest.raises(RegistryError, match=r"no version '9' \(versions: 1, 2\)"):
        promote("a", 9)
    with pytest.raises(RegistryError, match="not registered"):
        promote("zzz", 1)

    (m,) = [m for m in list_models() if m["name"] == "adrel-a"]
    assert m["aliases"] == {"champion": "2", "challenger": "2"}
    assert [v["version"] for v in m["versions"]] == ["1", "2"]


def test_checkpoint_one_version_per_training_run(
    exported, client, cache, tmp_path, tiny_encoder_dir
):
    from models.checkpoint import load_checkpoint

    ckpt, _ = exported
    exp = client.create_experiment("train", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    v1 = register_checkpoint(ckpt, run_id=run_id)
    assert (v1.name, v1.version, v1.aliases) == ("adrel-mtl", "1", ("challenger",))
    assert register_checkpoint(ckpt, run_id=run_id).version == "1"  # same run: same version
    assert register_checkpoint(ckpt).version == "1"  # same weights: no duplicate
    other = make_checkpoint(tiny_encoder_dir, tmp_path / "other", seed=1)
    v2 = register_checkpoint(other)
    assert v2.version == "2" and v2.run_id != run_id
    assert str(client.get_model_version_by_alias("adrel-mtl", "challenger").version) == "2"
    assert client.get_model_version("adrel-mtl", "1").run_id == run_id
    assert client.get_registered_model("adrel-mtl").tags["adrel.kind"] == "mtl"

    res = mu.resolve_model("models:/adrel-mtl/1")
    model, cfg = load_checkpoint(mu.find_payload(res.path, "adapter.safetensors"))
    assert model.tasks.names == list(TASKS)
    rows = _rows()
    import mlflow.pyfunc

    pred = mlflow.pyfunc.load_model("models:/adrel-mtl/1").predict(
        pd.DataFrame({**rows, "task": ["b"] * len(rows["query"])})
    )
    np.testing.assert_allclose(pred["logit"].to_numpy(), torch_logits(ckpt, "b", rows), atol=1e-5)
    # the task models exclude the checkpoint model from prefix look-ups
    assert mu.task_model_versions("adrel", "challenger") == {}


def _logged_run(client, out, tmp_path, finished: bool) -> str:
    exp = client.create_experiment(
        f"runs-{finished}", artifact_location=(tmp_path / f"art-{finished}").as_uri()
    )
    run_id = client.create_run(exp).info.run_id
    client.log_artifacts(run_id, str(out / "c"), "export-c")
    if finished:
        client.set_terminated(run_id)
    return run_id


def test_runs_uri_and_custom_prefix(exported, client, cache, tmp_path):
    _, out = exported
    run_id = _logged_run(client, out, tmp_path, finished=False)
    assert list(load_scorers(f"runs:/{run_id}/export-c")) == ["c"]
    res = mu.resolve_model(f"runs:/{run_id}/export-c")
    assert res.run_id == run_id and (res.path / "model.onnx").is_file()

    register_export(out, prefix="shop", tasks=["a", "b"])
    assert sorted(load_scorers("models:/shop@challenger")) == ["a", "b"]
    assert [m["name"] for m in list_models("shop")] == ["shop-a", "shop-b"]
    with pytest.raises(RegistryError, match="prefix"):
        list_models("bad/prefix")


def test_a_finished_runs_artifacts_are_cached_and_a_running_ones_removed_at_exit(
    exported, client, cache, tmp_path, monkeypatch, mlflow_uri
):
    import subprocess
    import sys

    _, out = exported
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    done = _logged_run(client, out, tmp_path, finished=True)
    first = mu.resolve_model(f"runs:/{done}/export-c")
    again = mu.resolve_model(f"runs:/{done}/export-c")
    assert first.path == again.path and (first.path / "model.onnx").is_file()
    assert mu.cache_root() in first.path.parents
    assert list(tmp.iterdir()) == []  # nothing left in the temp folder
    # Files deleted by hand from a cache entry: the entry is downloaded again.
    shutil.rmtree(first.path)
    again = mu.resolve_model(f"runs:/{done}/export-c")
    assert again.path == first.path and (again.path / "model.onnx").is_file()

    # A run still in progress may get more artifacts: downloaded afresh each time, into a
    # temporary folder that goes when the process exits.
    running = _logged_run(client, out, tmp_path, finished=False)
    code = (
        "import sys; from pipeline import model_uri as mu; "
        "a = mu.resolve_model(sys.argv[1]).path; b = mu.resolve_model(sys.argv[1]).path; "
        "assert a != b and (a / 'model.onnx').is_file() and (b / 'model.onnx').is_file(); "
        "print(a); print(b)"
    )
    env = {**os.environ, "TMPDIR": str(tmp)}
    res = subprocess.run(
        [sys.executable, "-c", code, f"runs:/{running}/export-c"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    paths = [Path(line) for line in res.stdout.split()]
    assert len(paths) == 2 and all(tmp in p.parents for p in paths)
    assert not any(p.exists() for p in paths) and list(tmp.iterdir()) == []

    with pytest.raises(mu.ModelURIError, match="cannot resolve runs:/0123abc"):
        mu.resolve_model("runs:/0123abc/export-c")


def test_the_model_cache_evicts_the_least_recently_used_entries(
    exported, client, cache, monkeypatch
):
    _, out = exported
    register_export(out, tasks=["c"])
    register_export(out, tasks=["c"])
    v1 = mu.resolve_model("models:/adrel-c/1").path
    size_mb = sum(f.stat().st_size for f in v1.rglob("*") if f.is_file()) / 2**20
    # Room for one version: publishing v2 evicts v1, unless v1 was used in the last hour.
    monkeypatch.setenv("ADREL_MODEL_CACHE_MAX_MB", str(size_mb * 1.5))
    v2 = mu.resolve_model("models:/adrel-c/2").path
    assert v1.is_dir() and v2.is_dir()
    stamp = next(p for p in [v1, *v1.parents] if (p / ".adrel-complete").is_file())
    hours_ago = time.time() - 2 * 3600
    os.utime(stamp / ".adrel-complete", (hours_ago, hours_ago))
    entry2 = next(p for p in [v2, *v2.parents] if (p / ".adrel-complete").is_file())
    assert mu.evict_cache() == [stamp] and not stamp.exists() and v2.is_dir()
    assert mu.evict_cache(keep=entry2) == []  # v2 is in use: the cache may stay over
    # Downloads a killed process left unfinished go after a day, not before.
    abandoned, ongoing = entry2.parent / "adrel-c-v3.tmp-a", entry2.parent / "adrel-c-v4.tmp-b"
    for d in (abandoned, ongoing):
        (d / "artifacts").mkdir(parents=True)
    two_days_ago = time.time() - 2 * 86400
    os.utime(abandoned, (two_days_ago, two_days_ago))
    mu.evict_cache()
    assert not abandoned.exists() and ongoing.is_dir()
    again = mu.resolve_model("models:/adrel-c/1").path  # downloaded again
    assert again == v1 and any(again.rglob("model.onnx"))
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("ADREL_MODEL_CACHE_MAX_MB", bad)
        with pytest.raises(mu.ModelURIError, match=f"ADREL_MODEL_CACHE_MAX_MB='{bad}'"):
            mu.evict_cache()


@pytest.mark.parametrize(
    "uri,match",
    [
        ("models:/", "bad model URI"),
        ("models:/x/abc", "not a number"),
        ("models:/x@a/b", "bad model URI"),
        ("runs:/", "bad run URI"),
        ("s3://bucket/x", "unsupported"),
        ("", "empty"),
    ],
)
def test_bad_model_uris(uri, match):
    with pytest.raises(mu.ModelURIError, match=match):
        mu.parse_model_uri(uri)


def test_parse_forms_and_missing_dir(tmp_path):
    assert mu.parse_model_uri("models:/adrel-a@champion").alias == "champion"
    assert mu.parse_model_uri("models:/adrel-a/latest").version == "latest"
    ref = mu.parse_model_uri("runs:/abc123/export/a")
    assert (ref.run_id, ref.path) == ("abc123", "export/a")
    assert mu.resolve_model(tmp_path).path == tmp_path.resolve()
    with pytest.raises(mu.ModelURIError, match="no such directory"):
        mu.resolve_model(tmp_path / "missing")


def test_model_uri_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from pipeline import model_uri, registry; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reading_a_store_that_is_not_there_creates_nothing(tmp_path, capsys):
    from jobs.cli import main

    db = tmp_path / "typo" / "mlflow.db"
    uri = f"sqlite:///{db}"
    with pytest.raises(RegistryError, match="no MLflow store at .*typo/mlflow.db"):
        list_models("adrel", uri)
    with pytest.raises(RegistryError, match="does not exist"):
        promote("shop", 1, tracking_uri=uri)
    with pytest.raises(mu.ModelURIError, match="no MLflow store"):
        mu.resolve_model("models:/adrel-shop@champion", tracking_uri=uri)
    assert not db.parent.exists()  # no empty store made at a mistyped path
    assert main(["models", "--tracking-uri", uri]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    # A URI MLflow cannot use at all: its own message, exit 2, no traceback.
    assert main(["models", "--tracking-uri", "bogus://x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adrel models: error: MLflow:") and "unsupported URI 'bogus://x'" in err
