"""Per-task merge: a plain base-architecture encoder that equals the adapted model per task."""

from __future__ import annotations

import pytest
import torch

from models.encoder import load_encoder
from models.merge import MergeError, merge_task, merged_encoder_state

from .helpers import tiny_model, token_batch


@pytest.mark.parametrize("lambda_type", ["diag", "full"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_merged_equals_unmerged_per_task(tiny_encoder_dir, lambda_type, pooling):
    model = tiny_model(tiny_encoder_dir, lambda_type=lambda_type)
    model.pooling = pooling
    ids, mask, types = token_batch(batch=5, seq=16)
    with torch.no_grad():
        for t in range(3):
            merged = merge_task(model, t)
            ref = model(ids, mask, torch.full((5,), t), types)
            out = merged(ids, mask, types)
            assert (out - ref).abs().max().item() <= 1e-5, t


def test_merged_model_is_the_plain_base_class_loaded_strict(tiny_encoder_dir):
    model = tiny_model(tiny_encoder_dir)
    merged = merge_task(model, "b")
    plain = load_encoder(str(tiny_encoder_dir))
    assert type(merged.encoder) is type(plain)
    # Same key set as the base model: loads strict=True into a fresh instance.
    assert set(merged.encoder.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(merged_encoder_state(model, "b"), strict=True)


def test_merge_does_not_touch_the_live_model(tiny_encoder_dir):
    model = tiny_model(tiny_encoder_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_task(model, 0)
    merge_task(model, 2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(model.adapter_layers()) == 12  # still adapted, not merged in place


def test_merges_differ_between_tasks(tiny_encoder_dir):
    model = tiny_model(tiny_encoder_dir)
    s0, s1 = merged_encoder_state(model, 0), merged_encoder_state(model, 1)
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(s0[key], s1[key])


def test_non_finite_merge_is_refused(tiny_encoder_dir):
    model = tiny_model(tiny_encoder_dir)
    layer = next(iter(model.adapter_layers().values()))
    with torch.no_grad():
        layer.lora_B[0, 0, 0] = float("inf")
    with pytest.raises(MergeError, match="non-finite"):
        merge_task(model, 0)


def test_bad_task_is_refused(tiny_encoder_dir):
    model = tiny_model(tiny_encoder_dir)
    with pytest.raises(ValueError, match="out of range"):
        merge_task(model, 7)
    with pytest.raises(KeyError, match="unknown task 'zzz'"):
        merge_task(model, "zzz")


@pytest.mark.slow
def test_merge_on_minilm(minilm_dir):
    from features.tasks import TaskRegistry
    from features.tokenize import PairTokenizer
    from models.checkpoint import build_model
    from models.config import AdapterConfig

    from .helpers import perturb_adapters

    torch.manual_seed(0)
    model = build_model(
        minilm_dir, AdapterConfig(num_tasks=2), TaskRegistry(["exact", "broad"]), head_dropout=0.0
    )
    perturb_adapters(model, seed=1, scale=0.05)
    model.eval()
    tok = PairTokenizer(minilm_dir, max_length=48)
    b = tok.encode(
        ["red running shoes", "cheap flights paris", "4k tv 55 inch"],
        ["Nike Air Zoom red runner", "Paris flights from $99", "Samsung 55in QLED 4K"],
        ["Lightweight trainers", None, "Smart TV with HDR"],
    )
    x = {k: torch.tensor(v) for k, v in b.items()}
    with torch.no_grad():
        for t in range(2):
            ref = model(
                x["input_ids"], x["attention_mask"], torch.full((3,), t), x["token_type_ids"]
            )
            out = merge_task(model, t)(x["input_ids"], x["attention_mask"], x["token_type_ids"])
            assert (out - ref).abs().max().item() <= 1e-5
