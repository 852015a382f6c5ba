"""Every registered adapter variant: forward vs per-task merge, gradients, checkpoint, size.

VARIANTS below is the per-variant test table; `test_every_registered_variant_is_tested`
fails when a variant is added to models.adapters.ADAPTERS without an entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from features.tokenize import PairTokenizer, prefix_queries
from models.adapters import ADAPTERS, adapter_class, uses_task_prefix
from models.checkpoint import load_checkpoint, read_config, save_checkpoint
from models.config import AdapterConfig
from models.merge import merge_task, merged_encoder_state

from .helpers import tiny_model, token_batch

TASKS = ("a", "b", "c")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; on a loaded shared box, threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass(frozen=True)
class VariantSpec:
    """What a variant must do. `layer_params(cfg, d_in, d_out)` is the count written out by hand
    (None: the variant wraps no layer); `task_aware`: merges differ between tasks;
    `encoder_trains`: the base encoder's own weights train."""

    layer_params: Callable[[AdapterConfig, int, int], int] | None
    task_aware: bool
    encoder_trains: bool = False
    task_prefix: bool = False


VARIANTS: dict[str, VariantSpec] = {
    "mtl_lora": VariantSpec(
        lambda c, i, o: c.r * i + c.num_tasks * c.r + c.n_up * o * c.r + c.num_tasks * c.n_up,
        task_aware=True,
    ),
    "lora": VariantSpec(lambda c, i, o: c.r * i + o * c.r, task_aware=False),
    "lora_task_prefix": VariantSpec(
        lambda c, i, o: c.r * i + o * c.r, task_aware=False, task_prefix=True
    ),
    "multilora": VariantSpec(
        lambda c, i, o: c.n_up * (c.r * i + o * c.r) + c.n_up, task_aware=False
    ),
    "moelora": VariantSpec(
        lambda c, i, o: c.n_up * (c.r * i + o * c.r) + c.num_tasks * c.n_up, task_aware=True
    ),
    "per_task_lora": VariantSpec(
        lambda c, i, o: c.num_tasks * (c.r * i + o * c.r), task_aware=True
    ),
    "full": VariantSpec(None, task_aware=False, encoder_trains=True),
    "heads_only": VariantSpec(None, task_aware=False),
}

ALL = sorted(ADAPTERS)


def _model(encoder_dir, variant: str, **kw):
    return tiny_model(encoder_dir, tasks=TASKS, variant=variant, r=4, n_up=2, **kw)


def test_every_registered_variant_is_tested():
    untested = sorted(set(ADAPTERS) - set(VARIANTS))
    stale = sorted(set(VARIANTS) - set(ADAPTERS))
    assert not untested, f"registered variants without forward/merge tests: {untested}"
    assert not stale, f"test table names variants that are not registered: {stale}"


@pytest.mark.parametrize("variant", ALL)
def test_merged_model_equals_adapted_model_for_each_task(tiny_encoder_dir, variant):
    model = _model(tiny_encoder_dir, variant)
    ids, mask, types = token_batch(batch=5, seq=16)
    with torch.no_grad():
        for t in range(len(TASKS)):
            assert adapter_class(variant).mergeable
            ref = model(ids, mask, torch.full((5,), t), types)
            out = merge_task(model, t)(ids, mask, types)
            assert (out - ref).abs().max().item() <= 1e-5, (variant, t)


@pytest.mark.parametrize("variant", ALL)
def test_mixed_task_batch_equals_single_task_batches(tiny_encoder_dir, variant):
    model = _model(tiny_encoder_dir, variant)
    ids, mask, types = token_batch(batch=6)
    task_ids = torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        mixed = model(ids, mask, task_ids, types)
        for t in range(len(TASKS)):
            idx = (task_ids == t).nonzero().squeeze(1)
            alone = model(ids[idx], mask[idx], task_ids[idx], types[idx])
            torch.testing.assert_close(mixed[idx], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ALL)
def test_merges_differ_between_tasks_only_for_task_aware_variants(tiny_encoder_dir, variant):
    model = _model(tiny_encoder_dir, variant)
    s0, s1 = merged_encoder_state(model, 0), merged_encoder_state(model, 1)
    same = all(torch.equal(s0[k], s1[k]) for k in s0)
    assert same == (not VARIANTS[variant].task_aware)
    if VARIANTS[variant].layer_params is not None:  # the adapter really moved the weights
        base = {n.replace(".base.", "."): p for n, p in model.encoder.named_parameters()}
        key = "encoder.layer.0.attention.self.query.weight"
        assert not torch.equal(s0[key], base[key])


@pytest.mark.parametrize("variant", ALL)
def test_gradients_only_where_they_should_be(tiny_encoder_dir, variant):
    spec = VARIANTS[variant]
    model = _model(tiny_encoder_dir, variant).train()
    ids, mask, types = token_batch()
    task_ids = torch.tensor([0, 1, 0, 1])  # task 2 is absent from the batch
    model.loss(model(ids, mask, task_ids, types), torch.tensor([1, 0, 1, 0])).backward()
    for name, p in model.named_parameters():
        is_adapter = ".lora_" in name or name.startswith("head_")
        should_train = is_adapter or spec.encoder_trains
        assert p.requires_grad == should_train, name
        if not should_train:
            assert p.grad is None, name
        elif "pooler" not in name:  # the pooler is not on the logit path
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Per-task rows of a task that is not in the batch get exactly zero gradient.
    for layer in model.adapter_layers().values():
        for pname in type(layer).task_params:
            grad = getattr(layer, pname).grad
            assert grad.shape[0] == len(TASKS)
            assert torch.count_nonzero(grad[2]) == 0, pname
            assert torch.count_nonzero(grad[:2]) > 0, pname
    assert torch.count_nonzero(model.head_weight.grad[2]) == 0


@pytest.mark.parametrize("variant", ALL)
def test_checkpoint_round_trip(tiny_encoder_dir, tmp_path, variant):
    model = _model(tiny_encoder_dir, variant)
    save_checkpoint(model, tmp_path / "ckpt", max_length=32, tokenizer_from=tiny_encoder_dir)
    cfg = read_config(tmp_path / "ckpt")
    assert cfg["adapter"]["variant"] == variant
    assert cfg["task_prefix"] is VARIANTS[variant].task_prefix
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    ids, mask, types = token_batch(batch=3)
    task_ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        assert torch.equal(model(ids, mask, task_ids, types), loaded(ids, mask, task_ids, types))
    assert loaded.num_trainable() == model.num_trainable()


@pytest.mark.parametrize("variant", ALL)
def test_parameter_count_formula(tiny_encoder_dir, variant):
    spec = VARIANTS[variant]
    model = _model(tiny_encoder_dir, variant)
    cfg = model.adapter_cfg
    hidden = model.encoder.config.hidden_size
    heads = len(TASKS) * (hidden + 1)
    if spec.layer_params is None:
        assert model.adapter_layers() == {}
        encoder = sum(p.numel() for p in model.encoder.parameters())
        assert model.num_trainable() == heads + (encoder if spec.encoder_trains else 0)
        return
    layers = model.adapter_layers()
    assert len(layers) == 12  # six linears in each of two layers
    expected = 0
    for layer in layers.values():
        own = sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base."))
        by_hand = spec.layer_params(cfg, layer.in_features, layer.out_features)
        assert own == by_hand == type(layer).num_params(cfg, layer.in_features, layer.out_features)
        expected += by_hand
    assert model.num_trainable() == expected + heads


def test_task_prefix_flag_follows_the_registry():
    assert {v for v in ADAPTERS if uses_task_prefix(v)} == {
        v for v, s in VARIANTS.items() if s.task_prefix
    }
    with pytest.raises(ValueError, match="unknown adapter variant 'nope'"):
        uses_task_prefix("nope")


def test_prefix_queries_is_explicit_and_checked():
    assert prefix_queries(["red shoes", "tv"], ["exact", "broad"]) == [
        "exact: red shoes",
        "broad: tv",
    ]
    with pytest.raises(ValueError, match="2 queries but 1 task names"):
        prefix_queries(["a", "b"], ["t"])


def test_pair_tokenizer_prepends_the_task_when_asked(tiny_encoder_dir):
    batch = {
        "task": np.array(["exact", "broad"]),
        "query": np.array(["red shoes", "cheap tv"]),
        "ad_title": np.array(["Nike red runner", "Samsung 55in"]),
    }
    plain = PairTokenizer(tiny_encoder_dir, max_length=32)
    prefixed = PairTokenizer(tiny_encoder_dir, max_length=32, task_prefix=True)(batch)
    ref = plain.encode(["exact: red shoes", "broad: cheap tv"], batch["ad_title"])
    assert np.array_equal(prefixed["input_ids"], ref["input_ids"])
    assert not np.array_equal(plain(batch)["input_ids"], ref["input_ids"])
    with pytest.raises(ValueError, match="no 'task' column"):
        PairTokenizer(tiny_encoder_dir, max_length=32, task_prefix=True)(
            {k: v for k, v in batch.items() if k != "task"}
        )


def test_non_wrapping_variants_refuse_to_wrap(tiny_encoder_dir):
    from models.adapters import TaskRouter

    layer = torch.nn.Linear(4, 4)
    for variant in ALL:
        cls = adapter_class(variant)
        if not cls.wraps:
            with pytest.raises(TypeError, match="wraps no layer"):
                cls(layer, AdapterConfig(variant=variant), TaskRouter(1))
