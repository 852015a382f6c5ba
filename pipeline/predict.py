"""Score query–ad rows with any model source behind one interface, for offline evaluation.

Sources (`load_predictor`):
- a multi-task checkpoint directory (PyTorch, all tasks; models.checkpoint format);
- a per-task export directory (`index.json` + one ONNX folder per task, serving.scorer);
- an MLflow URI (`models:/<name>@<alias>`, `models:/<name>/<version>`, `runs:/<id>/<path>`,
  or whatever serving.scorer.load_scorers accepts, e.g. a registered-name prefix with an
  alias): a registered checkpoint is scored by PyTorch, anything else through the Scorer.

Every predictor returns float64 probabilities (N,) in row order from `predict(rows, task)`,
so the same rows go through the champion and the challenger whatever their format.
serving.* is imported only when an export is scored, torch only when a checkpoint is.
"""

from __future__ import annotations

import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHECKPOINT_FORMAT = "adrel-checkpoint"
MLFLOW_SCHEMES = ("models:/", "runs:/")
TOKENIZE_CHUNK = 4096  # rows tokenised at once (bounds memory; sorted by length inside)

OnBatch = Callable[[int], None]  # called with the number of rows just scored (progress bars)


class ModelSourceError(ValueError):
    """A model URI/path cannot be loaded: says what was tried and why it failed."""


@dataclass
class ModelInfo:
    """Where a model came from: shown in reports and used to find its MLflow run."""

    uri: str
    kind: str  # "checkpoint" or "export"
    tasks: list[str]
    local_path: str | None = None
    mlflow_run_id: str | None = None
    registered_name: str | None = None
    registered_version: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "uri": self.uri,
            "kind": self.kind,
            "tasks": list(self.tasks),
            "local_path": self.local_path,
            "mlflow_run_id": self.mlflow_run_id,
            "registered_name": self.registered_name,
            "registered_version": self.registered_version,
            "thresholds": dict(self.thresholds),
            "extra": dict(self.extra),
        }


class Predictor(ABC):
    """Probabilities for rows of one task: `predict(rows, task) -> (N,) float64`."""

    info: ModelInfo

    @property
    def tasks(self) -> list[str]:
        return list(self.info.tasks)

    @abstractmethod
    def predict(self, rows, task: str, on_batch: OnBatch | None = None) -> np.ndarray: ...

    def diagnostics(self) -> dict | None:
        """Adapter internals (MTL-LoRA mixing and Λ similarity) when the source has them."""
        return None

    def _check_task(self, task: str) -> None:
        if task not in self.info.tasks:
            raise KeyError(f"model {self.info.uri} has no task {task!r}; its tasks: {self.tasks}")


# ---------------------------------------------------------------------------- rows


def row_columns(rows) -> tuple[list[str], list[str], list | None]:
    """(queries, titles, descriptions or None) from a DataFrame, pyarrow Table or dict."""
    try:
        import pyarrow as pa

        if isinstance(rows, (pa.Table, pa.RecordBatch)):
            rows = {c: rows.column(c).to_pylist() for c in rows.column_names}
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    cols = set(rows.keys()) if isinstance(rows, dict) else set(rows.columns)
    missing = [c for c in ("query", "ad_title") if c not in cols]
    if missing:
        raise KeyError(f"rows to score lack column(s) {missing}; they have {sorted(cols)}")
    queries = [str(q) for q in _as_list(rows["query"])]
    titles = [str(t) for t in _as_list(rows["ad_title"])]
    desc = _as_list(rows["ad_description"]) if "ad_description" in cols else None
    return queries, titles, desc


def _as_list(col) -> list:
    return col.tolist() if hasattr(col, "tolist") else list(col)


# ---------------------------------------------------------------------------- checkpoint


class CheckpointPredictor(Predictor):
    """The multi-task PyTorch model (unmerged adapters), batched under inference mode."""

    def __init__(
        self,
        ckpt_dir: str | Path,
        info: ModelInfo | None = None,
        batch_size: int = 64,
        device: str | None = None,
    ):
        from features.tokenize import PairTokenizer
        from models.checkpoint import load_checkpoint

        self.model, self.cfg = load_checkpoint(ckpt_dir)
        if device:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        kw = {"task_prefix": True} if self.cfg.get("task_prefix") else {}
        self.tokenizer = PairTokenizer(ckpt_dir, self.cfg.get("max_length", 128), **kw)
        self.batch_size = int(batch_size)
        extra = self.cfg.get("extra") or {}
        self.info = info or ModelInfo(uri=str(ckpt_dir), kind="checkpoint", tasks=[])
        self.info.kind = "checkpoint"
        self.info.tasks = self.model.tasks.names
        self.info.local_path = self.info.local_path or str(ckpt_dir)
        self.info.thresholds = {
            t: float(v) for t, v in (extra.get("thresholds") or {}).items() if v is not None
        }
        self.info.mlflow_run_id = self.info.mlflow_run_id or _run_id_from_meta(extra)
        self.info.extra = {"variant": self.cfg.get("adapter", {}).get("variant")}

    def predict(self, rows, task: str, on_batch: OnBatch | None = None) -> np.ndarray:
        import torch

        from features.tokenize import trim_batch

        self._check_task(task)
        queries, titles, desc = row_columns(rows)
        n = len(queries)
        out = np.empty(n, dtype=np.float64)  # (N,)
        task_id = self.model.tasks.id(task)
        with torch.inference_mode():
            for lo in range(0, n, TOKENIZE_CHUNK):
                hi = min(n, lo + TOKENIZE_CHUNK)
                batch = {
                    "query": np.asarray(queries[lo:hi], dtype=object),
                    "ad_title": np.asarray(titles[lo:hi], dtype=object),
                    "task": np.full(hi - lo, task, dtype=object),
                }
                if desc is not None:
                    batch["ad_description"] = np.asarray(desc[lo:hi], dtype=object)
                enc = self.tokenizer(batch)
                # Length-sorted batches pad only to their own longest row.
                order = np.argsort(enc["attention_mask"].sum(1), kind="stable")
                for s in range(0, len(order), self.batch_size):
                    idx = order[s : s + self.batch_size]
                    b = trim_batch(
                        {k: enc[k][idx] for k in ("input_ids", "attention_mask", "token_type_ids")}
                    )
                    t = {k: torch.from_numpy(v).to(self.device) for k, v in b.items()}
                    ids = torch.full((len(idx),), task_id, dtype=torch.long, device=self.device)
                    logits = self.model(
                        t["input_ids"], t["attention_mask"], ids, t["token_type_ids"]
                    )
                    out[lo + idx] = torch.sigmoid(logits.float()).cpu().numpy()
                    if on_batch:
                        on_batch(len(idx))
        return out

    def diagnostics(self) -> dict | None:
        return adapter_diagnostics(self.model)


def adapter_diagnostics(model) -> dict | None:
    """Per adapted layer: each task's softmax(w_t/τ) over the B_i, and cos-sim of the Λ_t.

    Returns None when the model has no MTL-LoRA-style layers (no `mixing()`/`lora_lambda`).
    """
    import torch

    layers = []
    for name, layer in model.adapter_layers().items():
        entry: dict = {"name": name}
        if hasattr(layer, "mixing"):
            with torch.no_grad():
                entry["mixing"] = layer.mixing().float().cpu().numpy()  # (T, n)
        lam = getattr(layer, "lora_lambda", None)
        if lam is not None:
            flat = lam.detach().float().cpu().reshape(lam.shape[0], -1).numpy()  # (T, r|r²)
            entry["lambda_cos"] = _cosine(flat)  # (T, T)
            entry["lambda_dev"] = _cosine(flat - _identity_like(lam))  # (T, T) of Λ_t − I
        if len(entry) > 1:
            layers.append(entry)
    if not layers:
        return None
    cfg = model.adapter_cfg
    out = {
        "tasks": model.tasks.names,
        "variant": cfg.variant,
        "tau": cfg.tau,
        "n_up": cfg.n_up,
        "r": cfg.r,
        "lambda_type": cfg.lambda_type,
        "layers": layers,
    }
    cos = [e["lambda_cos"] for e in layers if "lambda_cos" in e]
    if cos:
        out["lambda_cos_mean"] = np.mean(cos, axis=0)
        out["lambda_dev_mean"] = np.mean(
            [e["lambda_dev"] for e in layers if "lambda_dev" in e], axis=0
        )
    return out


def _identity_like(lam) -> np.ndarray:
    """The Λ init (ones or identity), flattened per task: the point tasks diverge from."""
    T = lam.shape[0]
    if lam.dim() == 2:
        return np.ones((T, lam.shape[1]), dtype=np.float32)
    return np.tile(np.eye(lam.shape[1], dtype=np.float32).reshape(1, -1), (T, 1))


def _cosine(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norm > 0, norm, 1.0)
    return unit @ unit.T


# ---------------------------------------------------------------------------- export


class ExportPredictor(Predictor):
    """Merged per-task ONNX models through serving.scorer (one Scorer per task)."""

    def __init__(self, scorers: dict, info: ModelInfo, chunk: int = 256):
        if not scorers:
            raise ModelSourceError(f"{info.uri} holds no task model")
        self.scorers = scorers
        self.chunk = int(chunk)
        self.info = info
        self.info.kind = "export"
        self.info.tasks = sorted(scorers)
        for task, s in scorers.items():
            thr = _scorer_threshold(s)
            if thr is not None:
                self.info.thresholds[task] = thr
        versions = {
            t: f"{m['registered_name']}/{m.get('registered_version')}"
            for t, m in ((t, _scorer_meta(s)) for t, s in scorers.items())
            if m.get("registered_name")
        }
        if versions:  # per-task registered models: one version each
            self.info.extra["task_versions"] = versions
        if not self.info.mlflow_run_id:
            metas = [_scorer_meta(s) for s in scorers.values()]
            ids = {_run_id_from_meta(m) for m in metas} - {None}
            self.info.mlflow_run_id = ids.pop() if len(ids) == 1 else None

    def predict(self, rows, task: str, on_batch: OnBatch | None = None) -> np.ndarray:
        self._check_task(task)
        queries, titles, desc = row_columns(rows)
        scorer = self.scorers[task]
        out = np.empty(len(queries), dtype=np.float64)
        for lo in range(0, len(queries), self.chunk):
            hi = min(len(queries), lo + self.chunk)
            d = desc[lo:hi] if desc is not None else None
            out[lo:hi] = np.asarray(
                scorer.score(queries[lo:hi], titles[lo:hi], d), dtype=np.float64
            )
            if on_batch:
                on_batch(hi - lo)
        return out


def _scorer_meta(scorer) -> dict:
    meta = getattr(scorer, "meta", None)
    return meta if isinstance(meta, dict) else {}


def _scorer_threshold(scorer) -> float | None:
    v = getattr(scorer, "threshold", None)
    if v is None:
        v = _scorer_meta(scorer).get("threshold")
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _run_id_from_meta(meta: dict) -> str | None:
    for key in ("mlflow_run_id", "run_id", "source_run_id", "source_run"):
        v = meta.get(key)
        if isinstance(v, str) and v:
            return v
    return None


# ---------------------------------------------------------------------------- loading


def load_predictor(
    uri: str | os.PathLike,
    tasks: list[str] | None = None,
    batch_size: int = 64,
    device: str | None = None,
    tracking_uri: str | None = None,
) -> Predictor:
    """A predictor for a checkpoint dir, an export dir or an MLflow model URI."""
    uri = str(uri)
    path = Path(uri).expanduser()
    if path.exists():
        return _load_local(path, uri, tasks, batch_size, device)
    if not uri.startswith(MLFLOW_SCHEMES):
        raise ModelSourceError(
            f"model {uri!r} is neither an existing directory nor an MLflow URI "
            f"(models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/<path>)"
        )
    from pipeline import model_uri as mu

    info = ModelInfo(uri=uri, kind="", tasks=[])
    tried = []
    ref = mu.parse_model_uri(uri)
    with tempfile.TemporaryDirectory(prefix="adrel-eval-model-") as tmp:
        try:
            # Registered versions are cached by model_uri; run artifacts go to a temp folder.
            res = mu.resolve_model(uri, tracking_uri, dst=tmp if ref.kind == "runs" else None)
        except mu.ModelURIError as exc:  # e.g. models:/<prefix>@<alias>: many task models
            tried.append(str(exc))
        else:
            info.mlflow_run_id = res.run_id
            info.registered_name, info.registered_version = res.name, res.version
            ckpt = find_checkpoint(res.path)
            if ckpt is not None:
                pred = CheckpointPredictor(ckpt, info, batch_size, device)
                if ref.kind == "runs":
                    pred.info.local_path = None  # a temporary download, gone after loading
                return pred
    try:
        return _export_predictor(uri, info, tasks, tracking_uri)
    except ImportError:
        raise
    except Exception as exc:
        tried.append(f"as exported task models: {exc}")
    raise ModelSourceError(f"cannot load model {uri!r}: " + "; ".join(tried))


def _load_local(path: Path, uri: str, tasks, batch_size, device) -> Predictor:
    if not path.is_dir():
        raise ModelSourceError(f"model path {path} is not a directory")
    info = ModelInfo(uri=uri, kind="", tasks=[], local_path=str(path.resolve()))
    ckpt = find_checkpoint(path, max_depth=0)
    if ckpt is not None:
        return CheckpointPredictor(ckpt, info, batch_size, device)
    if _is_export(path):
        return _export_predictor(str(path), info, tasks)
    raise ModelSourceError(
        f"{path} is neither a checkpoint (config.json with format {CHECKPOINT_FORMAT!r}) nor "
        "an export directory (index.json, or model.onnx + meta.json)"
    )


def _export_predictor(
    source: str, info: ModelInfo, tasks, tracking_uri: str | None = None
) -> ExportPredictor:
    from serving.scorer import load_scorers

    scorers = load_scorers(source, tasks=tasks, tracking_uri=tracking_uri)
    return ExportPredictor(dict(scorers), info)


def find_checkpoint(root: Path, max_depth: int = 4) -> Path | None:
    """The shallowest directory under `root` holding an adrel checkpoint config.json."""
    root = Path(root)
    frontier = [root]
    for _ in range(max_depth + 1):
        nxt = []
        for d in sorted(frontier):
            cfg = d / "config.json"
            if cfg.is_file() and _is_checkpoint_config(cfg):
                return d
            if d.is_dir():
                nxt.extend(p for p in d.iterdir() if p.is_dir())
        frontier = nxt
    return None


def _is_checkpoint_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == CHECKPOINT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_export(path: Path) -> bool:
    return (path / "index.json").is_file() or (
        (path / "model.onnx").is_file() and (path / "meta.json").is_file()
    )
