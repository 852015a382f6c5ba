"""The checkpoint directory: self-describing, safetensors only, loadable from the folder alone.

DIR/config.json          format, code version, base encoder spec + fingerprint, adapter
                         config, task registry, pooling, max_length, extra metadata
DIR/adapter.safetensors  every trainable tensor (adapters and heads)
DIR/tokenizer.json (+ tokenizer_config.json, vocab, special tokens)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from features.tasks import TaskRegistry
from models.adapters import uses_task_prefix
from models.classifier import RelevanceClassifier
from models.config import AdapterConfig
from models.encoder import fingerprint, load_encoder, tokenizer_dir

FORMAT = "adrel-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "adapter.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
)
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or does not match the model it describes."""


def code_version() -> str:
    try:
        from importlib.metadata import version

        return version("adrel")
    except Exception:  # running from a source tree without installed metadata
        return "unknown"


def build_model(
    base_model: str,
    adapter: AdapterConfig,
    tasks: TaskRegistry,
    pooling: str = "mean",
    head_dropout: float = 0.1,
) -> RelevanceClassifier:
    """A fresh classifier: load the base encoder, inject adapters, add per-task heads."""
    encoder = load_encoder(base_model)
    return RelevanceClassifier(
        encoder, adapter, tasks, pooling, head_dropout, base_model=str(base_model)
    )


def save_checkpoint(
    model: RelevanceClassifier,
    out_dir: str | Path,
    max_length: int = 128,
    tokenizer_from: str | Path | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the checkpoint directory (atomically: a temp folder renamed into place)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.trainable_state().items()
    }
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    cfg = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "code_version": code_version(),
        "base_model": model.base_model,
        "base_fingerprint": _base_fingerprint(model),
        "base_architecture": type(model.encoder).__name__,
        "adapter": model.adapter_cfg.to_dict(),
        # Scorers prepend the task name to queries when set (features.tokenize.prefix_queries).
        "task_prefix": uses_task_prefix(model.adapter_cfg.variant),
        "tasks": model.tasks.to_dict(),
        "pooling": model.pooling,
        "head_dropout": _dropout_p(model),
        "max_length": int(max_length),
        "trainable_parameters": model.num_trainable(),
        "extra": extra or {},
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    tok_src = Path(tokenizer_from) if tokenizer_from else tokenizer_dir(model.base_model)
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copy2(tok_src / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def read_config(ckpt_dir: str | Path) -> dict:
    d = Path(ckpt_dir)
    missing = [f for f in (*CHECKPOINT_FILES, "tokenizer.json") if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{d} is not an adrel checkpoint: missing {missing}")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    if cfg.get("format") != FORMAT:
        raise CheckpointError(
            f"{d / CONFIG_FILE} has format {cfg.get('format')!r}, expected {FORMAT!r}"
        )
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{d} was written by a newer adrel (format_version {cfg['format_version']}); upgrade adrel"
        )
    return cfg


def load_checkpoint(ckpt_dir: str | Path, base_model: str | None = None, strict_base: bool = True):
    """Rebuild the classifier from the directory alone; refuse mismatched shapes, tasks or base.

    `base_model` overrides where the base encoder is loaded from (same weights, other path).
    """
    d = Path(ckpt_dir)
    cfg = read_config(d)
    adapter = AdapterConfig.from_dict(cfg["adapter"])
    tasks = TaskRegistry.from_dict(cfg["tasks"])
    model = build_model(
        base_model or cfg["base_model"],
        adapter,
        tasks,
        cfg["pooling"],
        cfg.get("head_dropout", 0.0),
    )
    if (
        strict_base
        and cfg.get("base_fingerprint")
        and _base_fingerprint(model) != cfg["base_fingerprint"]
    ):
        raise CheckpointError(
            f"the base encoder at {model.base_model!r} is not the one this checkpoint was trained on "
            f"(fingerprint {_base_fingerprint(model)} != {cfg['base_fingerprint']})"
        )
    load_trainable(model, load_file(str(d / WEIGHTS_FILE)), source=str(d))
    model.eval()
    return model, cfg


def load_trainable(
    model: RelevanceClassifier, tensors: dict[str, torch.Tensor], source: str = ""
) -> None:
    expected = model.trainable_state()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad_shape = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(
                f"unexpected tensors {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
            )
        if bad_shape:
            parts.append("shape mismatch " + "; ".join(bad_shape[:5]))
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + "; ".join(parts))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k].to(p.dtype))


def _base_fingerprint(model: RelevanceClassifier) -> str:
    # The frozen base weights only, under their base-architecture names.
    frozen = {
        n.replace(".base.", "."): p
        for n, p in model.encoder.named_parameters()
        if not p.requires_grad
    }
    return fingerprint(frozen)


def _dropout_p(model: RelevanceClassifier) -> float:
    return float(getattr(model.head_dropout, "p", 0.0))
