"""The MLflow model registry for adrel: what gets registered, aliases, and recorded promotions.

Registered models (prefix configurable, default "adrel"):
- `<prefix>-mtl`: the multi-task checkpoint (PyTorch, all tasks); one version per training run.
- `<prefix>-<task>`: that task's merged ONNX export; one version per export.

Both are pyfunc models whose code is serving/pyfunc.py (models-from-code: an ORT session is
not picklable and MLflow refuses pickles by default); the adrel payload folder is the model's
artifact "model", so `serving.scorer.load_scorers("models:/adrel-<task>@champion")` and
`pipeline.model_uri` find it inside the downloaded model.

Aliases: every new version gets `challenger`; `champion` moves only through `promote`, which
records who/when/from/to/why in version tags, a registered-model tag and one MLflow run per
promotion (experiment `<prefix>-promotions`, artifact promotion.json): the registry itself
keeps no alias history.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.tracking import artifact_location

DEFAULT_PREFIX = "adrel"
CHALLENGER = "challenger"
CHAMPION = "champion"
KIND_TAG = "adrel.kind"
TASK_TAG = "adrel.task"
PYFUNC_CODE = Path(__file__).resolve().parent.parent / "serving" / "pyfunc.py"
TASK_REQUIREMENTS = ["onnxruntime", "tokenizers", "numpy", "pandas"]
MTL_REQUIREMENTS = ["torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas"]


class RegistryError(ValueError):
    """A registry operation cannot proceed (unknown model/version, bad prefix or task)."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str | None
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Promotion:
    """One champion move: recorded because the registry only keeps the current alias."""

    name: str
    task: str
    from_version: str | None
    to_version: str
    actor: str
    reason: str
    at: str
    record_run_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Names and the MLflow context


def check_prefix(prefix: str) -> str:
    from features.tasks import TASK_NAME_RE

    if not isinstance(prefix, str) or not TASK_NAME_RE.match(prefix):
        raise RegistryError(
            f"invalid registered-model prefix {prefix!r}: use letters, digits, '_' or '-'"
        )
    return prefix


def task_model_name(task: str, prefix: str = DEFAULT_PREFIX) -> str:
    from features.tasks import check_task_name

    return f"{check_prefix(prefix)}-{check_task_name(task)}"


def mtl_model_name(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{check_prefix(prefix)}-mtl"


def _tracking_uri(tracking_uri: str | None) -> str:
    import mlflow

    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    uri = _tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _reading_client(tracking_uri: str | None):
    """A client for reading (list, promote): the store must already exist."""
    from pipeline.model_uri import ModelURIError, require_store

    try:
        require_store(_tracking_uri(tracking_uri))
    except ModelURIError as e:
        raise RegistryError(str(e)) from None
    return _client(tracking_uri)


def _experiment(client, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri))
    except Exception:  # created concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _ensure_registered_model(client, name: str, tags: dict[str, str]) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        with contextlib.suppress(MlflowException):  # a concurrent create is fine
            client.create_registered_model(name, tags=tags)
    for k, v in tags.items():
        client.set_registered_model_tag(name, k, v)


def _log_pyfunc(
    client,
    payload: Path,
    kind: str,
    name: str,
    run_id: str,
    artifact_path: str,
    signature,
    input_example,
    requirements: list[str],
) -> RegisteredVersion:
    """Save `payload` as a pyfunc model, log it under the run, register a new version of `name`.

    Explicit client calls only (no fluent API): MLflow's set_tracking_uri/set_registry_uri
    are process-global and leak into the environment of everything that runs after.
    """
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="adrel-pyfunc-") as tmp, _quiet_mlflow():
        local = Path(tmp) / artifact_path
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=str(PYFUNC_CODE),
            artifacts={"model": str(payload)},
            model_config={"kind": kind, "providers": "auto"},
            signature=signature,
            input_example=input_example,
            pip_requirements=requirements,
        )
        client.log_artifacts(run_id, str(local), artifact_path)
    mv = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id)
    return RegisteredVersion(name, str(mv.version), run_id)


@contextlib.contextmanager
def _quiet_mlflow():
    import logging

    loggers = [logging.getLogger(n) for n in ("mlflow", "mlflow.models", "mlflow.pyfunc")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _signature(with_task: bool):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    cols = [ColSpec("string", "query"), ColSpec("string", "ad_title")]
    cols.append(ColSpec("string", "ad_description", required=False))
    if with_task:
        cols.append(ColSpec("string", "task"))
    out = Schema([ColSpec("double", "logit"), ColSpec("double", "score")])
    return ModelSignature(inputs=Schema(cols), outputs=out)


def _input_example(task: str | None = None):
    import pandas as pd

    d = {
        "query": ["running shoes", "cheap flights paris"],
        "ad_title": ["Trailblazer Men's Running Shoe", "Flights to Paris from $199"],
        "ad_description": ["Breathable mesh upper, cushioned sole.", "Book today."],
    }
    if task is not None:
        d["task"] = [task, task]
    return pd.DataFrame(d)


def _tag_value(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return s[:5000]  # MLflow's tag value limit


# ---------------------------------------------------------------------------------------------
# Registering


def register_checkpoint(
    ckpt_dir: str | Path,
    run_id: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    tracking_uri: str | None = None,
    tags: dict | None = None,
) -> RegisteredVersion:
    """Register a multi-task checkpoint as a new `<prefix>-mtl` version (alias challenger).

    run_id: the training run the checkpoint came from (the model is logged into it).
    A training run already registered returns its existing version: one version per training
    run, never duplicates. Without `run_id`, a registered checkpoint with the same weights is
    that version (registering a local directory twice adds nothing); a new training run gets
    its own version even when its weights equal an earlier run's (its lineage differs).
    """
    from models.checkpoint import WEIGHTS_FILE, read_config
    from pipeline.stages import file_sha256

    ckpt = Path(ckpt_dir)
    cfg = read_config(ckpt)
    client = _client(tracking_uri)
    uri = _tracking_uri(tracking_uri)
    name = mtl_model_name(prefix)
    digest = file_sha256(ckpt / WEIGHTS_FILE)
    for mv in _search_versions(client, name):
        same = mv.run_id == run_id if run_id else mv.tags.get("adrel.checkpoint_sha256") == digest
        if same:
            return RegisteredVersion(name, str(mv.version), mv.run_id, _aliases_of(client, mv))
    if not run_id:
        exp = _experiment(client, f"{prefix}-registry", uri)
        run_id = client.create_run(exp, run_name=f"register-{name}").info.run_id
    _ensure_registered_model(client, name, {KIND_TAG: "mtl"})
    first_task = sorted(cfg["tasks"], key=cfg["tasks"].get)[0]
    rv = _log_pyfunc(
        client, ckpt, "checkpoint", name, run_id, f"registry/{name}",
        _signature(True), _input_example(first_task), MTL_REQUIREMENTS,
    )  # fmt: skip
    vtags = {
        "adrel.tasks": ",".join(sorted(cfg["tasks"], key=cfg["tasks"].get)),
        "adrel.base_model": str(cfg.get("base_model")),
        "adrel.source_run": run_id,
        "adrel.checkpoint_sha256": digest,
        **{k: _tag_value(v) for k, v in (tags or {}).items()},
    }
    for k, v in vtags.items():
        client.set_model_version_tag(name, rv.version, k, v)
    client.set_registered_model_alias(name, CHALLENGER, rv.version)
    return RegisteredVersion(name, rv.version, run_id, (CHALLENGER,))


def _search_versions(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return []


def _aliases_of(client, mv) -> tuple[str, ...]:
    return _version_aliases(client.get_registered_model(mv.name).aliases, mv.version)


def _version_aliases(aliases: dict | None, version) -> tuple[str, ...]:
    """The aliases (of a registered model's alias map) that point at `version`; MLflow hands
    versions back as int or str depending on the store, so they compare as strings."""
    return tuple(sorted(a for a, v in (aliases or {}).items() if str(v) == str(version)))


def register_export(
    export_dir: str | Path,
    prefix: str = DEFAULT_PREFIX,
    tracking_uri: str | None = None,
    source_run_id: str | None = None,
    tasks: list[str] | None = None,
) -> dict[str, RegisteredVersion]:
    """Register each exported task as a new `<prefix>-<task>` version (alias challenger).

    One MLflow run (experiment `<prefix>-exports`) holds the export's models; each version is
    tagged with task, source model/run, parity figures and metrics.
    """
    from pipeline.export import META_FILE, PARITY_FILE, read_index

    export = Path(export_dir)
    index = read_index(export)
    tasks = tasks or list(index["tasks"])
    client = _client(tracking_uri)
    uri = _tracking_uri(tracking_uri)
    source_run_id = source_run_id or index.get("source_run_id")
    exp = _experiment(client, f"{prefix}-exports", uri)
    run = client.create_run(
        exp,
        run_name=f"export-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"adrel.source_model": str(index.get("source_model")), "adrel.tasks": ",".join(tasks)},
    )
    run_id = run.info.run_id
    out = {}
    try:
        for task in tasks:
            d = export / task
            meta = json.loads((d / META_FILE).read_text())
            parity = json.loads((d / PARITY_FILE).read_text())
            name = task_model_name(task, prefix)
            _ensure_registered_model(client, name, {KIND_TAG: "task", TASK_TAG: task})
            rv = _log_pyfunc(
                client, d, "task", name, run_id, f"registry/{name}",
                _signature(False), _input_example(), TASK_REQUIREMENTS,
            )  # fmt: skip
            for k, v in _export_tags(meta, parity, source_run_id).items():
                client.set_model_version_tag(name, rv.version, k, v)
            _log_export_metrics(client, run_id, task, meta, parity)
            client.set_registered_model_alias(name, CHALLENGER, rv.version)
            out[task] = RegisteredVersion(name, rv.version, run_id, (CHALLENGER,))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return out


def _export_tags(meta: dict, parity: dict, source_run_id: str | None) -> dict[str, str]:
    variants = parity["variants"]
    tags = {
        TASK_TAG: meta["task"],
        "adrel.source_model": str(meta.get("source_model")),
        "adrel.source_run": str(source_run_id or meta.get("source_run_id") or ""),
        "adrel.base_model": str(meta.get("base_model")),
        "adrel.serving_variant": meta.get("serving_variant", "fp32"),
        "adrel.model_version": str(meta.get("model_version")),
        "adrel.max_length": str(meta.get("max_length")),
        "adrel.threshold": "" if meta.get("threshold") is None else str(meta["threshold"]),
        "adrel.metrics": _tag_value(meta.get("metrics") or {}),
    }
    for v, rep in variants.items():
        tags[f"adrel.parity.{v}.max_abs_diff"] = f"{rep['max_abs_diff']:.3e}"
        tags[f"adrel.parity.{v}.pass"] = str(rep["pass"]).lower()
        if rep.get("auc"):
            tags["adrel.int8.auc_delta"] = f"{rep['auc']['delta']:+.5f}"
    return tags


def _log_export_metrics(client, run_id: str, task: str, meta: dict, parity: dict) -> None:
    import math

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    vals = {
        f"{task}.parity.{v}.max_abs_diff": r["max_abs_diff"] for v, r in parity["variants"].items()
    }
    auc = parity["variants"].get("int8", {}).get("auc")
    if auc:
        vals.update({f"{task}.int8.auc_fp32": auc["fp32"], f"{task}.int8.auc": auc["int8"]})
    vals.update({f"{task}.{k}": v for k, v in (meta.get("metrics") or {}).items()})
    ms = [Metric(k, float(v), ts, 0) for k, v in vals.items() if math.isfinite(float(v))]
    if ms:
        client.log_batch(run_id, metrics=ms)


# ---------------------------------------------------------------------------------------------
# Promotion


def promote(
    task: str,
    version: str | int,
    reason: str = "",
    actor: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    tracking_uri: str | None = None,
) -> Promotion:
    """Move `champion` of `<prefix>-<task>` to `version` and record the move.

    `task` may be "mtl" for the multi-task model. Raises RegistryError for an unknown model or
    version. Promoting the current champion again is recorded too (an explicit decision).
    """
    from mlflow.exceptions import MlflowException

    name = mtl_model_name(prefix) if task == "mtl" else task_model_name(task, prefix)
    client = _reading_client(tracking_uri)
    uri = _tracking_uri(tracking_uri)
    version = str(version)
    try:
        client.get_model_version(name, version)
    except MlflowException:
        known = _versions(client, name)
        raise RegistryError(
            f"{name} has no version {version!r}"
            + (f" (versions: {', '.join(known)})" if known else " (model not registered)")
        ) from None
    try:
        prev = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        prev = None
    actor = actor or _actor()
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    p = Promotion(name, task, prev, version, actor, reason or "", at)
    record_run = _record_promotion(client, uri, prefix, p)
    p = Promotion(**{**p.to_dict(), "record_run_id": record_run})
    client.set_registered_model_alias(name, CHAMPION, version)
    rec = _tag_value(p.to_dict())
    client.set_model_version_tag(name, version, "adrel.promoted_at", at)
    client.set_model_version_tag(name, version, "adrel.promoted_by", actor)
    client.set_model_version_tag(name, version, "adrel.promotion", rec)
    if prev and prev != version:
        client.set_model_version_tag(name, prev, "adrel.demoted_at", at)
    client.set_registered_model_tag(name, "adrel.last_promotion", rec)
    return p


def _record_promotion(client, tracking_uri: str, prefix: str, p: Promotion) -> str:
    exp = _experiment(client, f"{prefix}-promotions", tracking_uri)
    tags = {
        "adrel.model": p.name,
        "adrel.task": p.task,
        "adrel.from_version": p.from_version or "",
        "adrel.to_version": p.to_version,
        "adrel.actor": p.actor,
        "adrel.reason": p.reason[:5000],
    }
    run = client.create_run(exp, run_name=f"promote-{p.name}-v{p.to_version}", tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "promotion.json"
        f.write_text(json.dumps(p.to_dict(), indent=2))
        client.log_artifact(run.info.run_id, str(f))
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def promotion_history(
    task: str, prefix: str = DEFAULT_PREFIX, tracking_uri: str | None = None
) -> list[dict]:
    """Every recorded promotion of `<prefix>-<task>`, oldest first (from the promotion runs)."""
    name = mtl_model_name(prefix) if task == "mtl" else task_model_name(task, prefix)
    client = _reading_client(tracking_uri)
    exp = client.get_experiment_by_name(f"{prefix}-promotions")
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`adrel.model` = '{name}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )
    return [
        {
            "name": name,
            "from_version": r.data.tags.get("adrel.from_version") or None,
            "to_version": r.data.tags.get("adrel.to_version"),
            "actor": r.data.tags.get("adrel.actor"),
            "reason": r.data.tags.get("adrel.reason", ""),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.info.start_time / 1000)),
            "record_run_id": r.info.run_id,
        }
        for r in runs
    ]


def _actor() -> str:
    for key in ("ADREL_ACTOR", "USER", "LOGNAME"):
        if os.environ.get(key):
            return os.environ[key]
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _versions(client, name: str) -> list[str]:
    from mlflow.exceptions import MlflowException

    try:
        return sorted(
            (str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int
        )
    except MlflowException:
        return []


# ---------------------------------------------------------------------------------------------
# Listing


def list_models(prefix: str = DEFAULT_PREFIX, tracking_uri: str | None = None) -> list[dict]:
    """Registered adrel models under `prefix`: name, kind, task, versions with aliases/tags."""
    client = _reading_client(tracking_uri)
    out = []
    for rm in client.search_registered_models(f"name LIKE '{check_prefix(prefix)}-%'"):
        versions = client.search_model_versions(f"name = '{rm.name}'")
        aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
        out.append(
            {
                "name": rm.name,
                "kind": rm.tags.get(KIND_TAG, ""),
                "task": rm.tags.get(TASK_TAG, ""),
                "aliases": aliases,
                "versions": [
                    {
                        "version": str(v.version),
                        "aliases": list(_version_aliases(aliases, v.version)),
                        "run_id": v.run_id,
                        "created": time.strftime(
                            "%Y-%m-%d %H:%M", time.gmtime(v.creation_timestamp / 1000)
                        ),
                        "parity": v.tags.get("adrel.parity.fp32.max_abs_diff", ""),
                        "source_run": v.tags.get("adrel.source_run", ""),
                    }
                    for v in sorted(versions, key=lambda v: int(v.version))
                ],
            }
        )
    return sorted(out, key=lambda m: m["name"])
