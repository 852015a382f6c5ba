"""RelevanceClassifier on a real (tiny random) BERT: injection, routing, gradients."""

from __future__ import annotations

import pytest
import torch

from features.tasks import TaskRegistry
from models.checkpoint import build_model
from models.config import AdapterConfig, ConfigError
from models.encoder import load_encoder
from models.inject import find_targets

from .helpers import tiny_model, token_batch


def test_default_targets_adapt_all_six_linears_per_layer(tiny_encoder_dir):
    model = tiny_model(tiny_encoder_dir)
    assert len(model.adapted) == 6 * 2  # q, k, v, attn out, ffn in, ffn out × 2 layers
    assert not any("pooler" in n for n in model.adapted)


def test_only_adapters_and_heads_get_gradients(tiny_encoder_dir):
    model = tiny_model(tiny_encoder_dir).train()
    ids, mask, types = token_batch()
    logits = model(ids, mask, torch.tensor([0, 1, 2, 0]), types)
    model.loss(logits, torch.tensor([1, 0, 1, 0])).backward()
    for name, p in model.named_parameters():
        is_adapter = ".lora_" in name or name.startswith("head_")
        assert p.requires_grad == is_adapter, name
        if is_adapter:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name


def test_mixed_batch_equals_per_task_batches(tiny_encoder_dir):
    model = tiny_model(tiny_encoder_dir)
    ids, mask, types = token_batch(batch=6)
    task_ids = torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        mixed = model(ids, mask, task_ids, types)
        for t in range(3):
            idx = (task_ids == t).nonzero().squeeze(1)
            alone = model(ids[idx], mask[idx], task_ids[idx], types[idx])
            torch.testing.assert_close(mixed[idx], alone, atol=1e-5, rtol=1e-5)


def test_tasks_differ_once_adapters_are_non_zero(tiny_encoder_dir):
    model = tiny_model(tiny_encoder_dir)
    ids, mask, types = token_batch(batch=1)
    with torch.no_grad():
        outs = [model(ids, mask, torch.tensor([t]), types).item() for t in range(3)]
    assert len({round(o, 6) for o in outs}) == 3


def test_zero_B_model_equals_frozen_encoder(tiny_encoder_dir):
    model = build_model(
        str(tiny_encoder_dir),
        AdapterConfig(num_tasks=2),
        TaskRegistry(["a", "b"]),
        head_dropout=0.0,
    )
    plain = load_encoder(str(tiny_encoder_dir)).eval()
    model.eval()
    ids, mask, types = token_batch()
    with torch.no_grad():
        model.router.task_ids = torch.tensor([0, 1, 0, 1])
        adapted = model.encoder(
            input_ids=ids, attention_mask=mask, token_type_ids=types
        ).last_hidden_state
        model.router.task_ids = None
        ref = plain(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert torch.equal(adapted, ref)


def test_unknown_target_lists_what_exists(tiny_encoder_dir):
    with pytest.raises(ConfigError) as e:
        build_model(
            str(tiny_encoder_dir),
            AdapterConfig(num_tasks=1, targets=["q_proj"]),
            TaskRegistry(["a"]),
        )
    assert "q_proj" in str(e.value) and "attention.self.query" in str(e.value)


def test_custom_targets_subset(tiny_encoder_dir):
    enc = load_encoder(str(tiny_encoder_dir))
    names = find_targets(enc, ["query", "value"])
    assert len(names) == 4 and all(n.endswith(("query", "value")) for n in names)


def test_bad_task_ids_and_task_count(tiny_encoder_dir):
    model = tiny_model(tiny_encoder_dir)
    ids, mask, types = token_batch(batch=2)
    with pytest.raises(ValueError, match="task id 3 at position 1"):
        model(ids, mask, torch.tensor([0, 3]), types)
    with pytest.raises(ConfigError, match="num_tasks=2 but the task registry has 3"):
        build_model(
            str(tiny_encoder_dir), AdapterConfig(num_tasks=2), TaskRegistry(["a", "b", "c"])
        )


def test_pooling_is_validated(tiny_encoder_dir):
    with pytest.raises(ConfigError, match="pooling"):
        build_model(
            str(tiny_encoder_dir), AdapterConfig(num_tasks=1), TaskRegistry(["a"]), pooling="max"
        )
