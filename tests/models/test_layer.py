"""The MTL-LoRA layer against the formula, computed densely."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.adapters import MTLLoRALinear, TaskRouter
from models.adapters.moelora import MoELoRALinear
from models.config import AdapterConfig, ConfigError


def make_layer(lambda_type="diag", T=3, r=4, n=2, d_in=10, d_out=7, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    cfg = AdapterConfig(r=r, n_up=n, num_tasks=T, tau=0.7, alpha=8.0, lambda_type=lambda_type, **kw)
    router = TaskRouter(T)
    layer = MTLLoRALinear(base, cfg, router)
    with torch.no_grad():  # non-zero B, non-identity Λ, non-uniform w
        layer.lora_B.normal_(std=0.5)
        layer.lora_lambda.add_(torch.randn_like(layer.lora_lambda) * 0.5)
        layer.lora_w.normal_(std=1.0)
    return layer, router


def dense_reference(layer: MTLLoRALinear, x: torch.Tensor, t: int) -> torch.Tensor:
    """W0·x + b + (α/r)·B_t·Λ_t·A·x with every matrix built explicitly."""
    cfg = layer.cfg
    mix = torch.softmax(layer.lora_w[t] / cfg.tau, dim=0)
    B_t = sum(mix[i] * layer.lora_B[i] for i in range(cfg.n_up))  # (d_out, r)
    lam = layer.lora_lambda[t]
    Lam = torch.diag(lam) if cfg.lambda_type == "diag" else lam  # (r, r)
    W = layer.base.weight + (cfg.alpha / cfg.r) * B_t @ Lam @ layer.lora_A
    return x @ W.T + layer.base.bias


@pytest.mark.parametrize("lambda_type", ["diag", "full"])
def test_forward_matches_dense_formula(lambda_type):
    layer, router = make_layer(lambda_type)
    x = torch.randn(6, 5, 10)
    task_ids = torch.tensor([0, 1, 2, 2, 0, 1])
    router.task_ids = task_ids
    out = layer(x)
    for i, t in enumerate(task_ids.tolist()):
        ref = dense_reference(layer, x[i], t)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lambda_type", ["diag", "full"])
def test_delta_weight_is_the_formula(lambda_type):
    layer, _ = make_layer(lambda_type)
    x = torch.randn(3, 10)
    for t in range(3):
        merged = x @ (layer.base.weight + layer.delta_weight(t)).T + layer.base.bias
        torch.testing.assert_close(merged, dense_reference(layer, x, t), atol=1e-5, rtol=1e-5)


def test_zero_B_init_reproduces_base_exactly():
    base = nn.Linear(10, 7)
    cfg = AdapterConfig(r=4, n_up=3, num_tasks=2)
    router = TaskRouter(2)
    layer = MTLLoRALinear(base, cfg, router)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.equal(layer.lora_lambda, torch.ones(2, 4))
    x = torch.randn(4, 3, 10)
    router.task_ids = torch.tensor([0, 1, 1, 0])
    assert torch.equal(layer(x), base(x))


def test_full_lambda_initialises_to_identity():
    layer = MTLLoRALinear(
        nn.Linear(5, 5), AdapterConfig(r=3, num_tasks=2, lambda_type="full"), TaskRouter(2)
    )
    assert torch.equal(layer.lora_lambda, torch.eye(3).expand(2, 3, 3))


def test_uniform_mix_init_gives_equal_weights():
    layer = MTLLoRALinear(
        nn.Linear(5, 5), AdapterConfig(n_up=4, num_tasks=2, mix_init="uniform"), TaskRouter(2)
    )
    torch.testing.assert_close(layer.mixing(), torch.full((2, 4), 0.25))


def test_default_mix_init_is_the_authors_kaiming_uniform():
    cfg = AdapterConfig(n_up=4, num_tasks=64)
    assert (cfg.mix_init, cfg.tau) == ("kaiming", 0.1)
    w = MTLLoRALinear(nn.Linear(5, 5), cfg, TaskRouter(64)).lora_w
    assert w.abs().max() <= 0.5  # uniform on ±1/sqrt(n)
    assert 0.25 < w.std() < 0.33  # 0.5/sqrt(3) = 0.289
    gate = MoELoRALinear(nn.Linear(5, 5), cfg, TaskRouter(64)).lora_gate
    assert gate.abs().max() <= 0.5 and gate.std() > 0.25


def _train_up_projections(cfg: AdapterConfig, steps: int = 30) -> torch.Tensor:
    """Adam on a two-task regression, mixing logits held at their init; returns the B_i."""
    torch.manual_seed(0)
    router = TaskRouter(cfg.num_tasks)
    layer = MTLLoRALinear(nn.Linear(6, 4), cfg, router)
    params = [p for n, p in layer.named_parameters() if "lora_" in n and n != "lora_w"]
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.randn(32, 6)
    router.task_ids = torch.arange(32) % 2
    target = torch.randn(32, 4)
    for _ in range(steps):
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
    return layer.lora_B.detach()


def test_uniform_mixing_keeps_the_up_projections_equal_and_sharp_mixing_does_not():
    # With every task blending the B_i evenly, each B_i gets the same gradient and Adam moves
    # them identically: n up-projections train as one (w_t drifts only slowly at a small lr,
    # so this is the regime of a small-std init at a high tau). The default init splits them.
    flat = _train_up_projections(AdapterConfig(r=2, n_up=3, num_tasks=2, mix_init="uniform"))
    assert flat.abs().max() > 0.05
    torch.testing.assert_close(flat[0], flat[1])
    torch.testing.assert_close(flat[0], flat[2])
    sharp = _train_up_projections(AdapterConfig(r=2, n_up=3, num_tasks=2))
    assert (sharp[0] - sharp[1]).abs().max() > 0.05
    assert (sharp[0] - sharp[2]).abs().max() > 0.05


def test_mixed_batch_equals_per_task_batches():
    layer, router = make_layer()
    x = torch.randn(8, 5, 10)
    task_ids = torch.tensor([2, 0, 1, 2, 1, 0, 0, 2])
    router.task_ids = task_ids
    mixed = layer(x)
    for t in range(3):
        idx = (task_ids == t).nonzero().squeeze(1)
        router.task_ids = task_ids[idx]
        torch.testing.assert_close(mixed[idx], layer(x[idx]), atol=1e-6, rtol=1e-6)


def test_parameter_count_matches_formula():
    d_in, d_out, r, n, T = 10, 7, 4, 2, 3
    layer, _ = make_layer(T=T, r=r, n=n, d_in=d_in, d_out=d_out)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == r * d_in + T * r + n * d_out * r + T * n
    full, _ = make_layer("full", T=T, r=r, n=n, d_in=d_in, d_out=d_out)
    assert (
        sum(p.numel() for p in full.parameters() if p.requires_grad)
        == r * d_in + T * r * r + n * d_out * r + T * n
    )


def test_base_is_frozen_and_untouched_by_training_step():
    layer, router = make_layer()
    w0 = layer.base.weight.detach().clone()
    router.task_ids = torch.tensor([0, 1])
    layer(torch.randn(2, 10)).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    for name in ("lora_A", "lora_B", "lora_lambda", "lora_w"):
        assert getattr(layer, name).grad is not None, name
    assert torch.equal(layer.base.weight, w0)


def test_task_id_out_of_range_raises_clearly():
    from models.adapters import check_task_ids

    with pytest.raises(ValueError, match=r"task id 5 at position 1 is out of range.*3 tasks"):
        check_task_ids(torch.tensor([0, 5, 1]), 3)
    with pytest.raises(ValueError, match="task id -1"):
        check_task_ids(torch.tensor([-1]), 3)
    with pytest.raises(TypeError, match="integer"):
        check_task_ids(torch.tensor([0.0]), 3)


def test_layer_without_task_ids_raises():
    layer, _ = make_layer()
    with pytest.raises(RuntimeError, match="without task ids"):
        layer(torch.randn(2, 10))


def test_config_reports_every_error_at_once():
    with pytest.raises(ConfigError) as e:
        AdapterConfig(r=0, n_up=0, tau=0.0, num_tasks=0, lambda_type="banded", mix_init="xavier")
    msg = str(e.value)
    for field in ("r must", "n_up must", "tau must", "num_tasks must", "lambda_type", "mix_init"):
        assert field in msg, field
    assert "'banded'" in msg and len(e.value.errors) == 6


def test_config_round_trip_and_unknown_field():
    cfg = AdapterConfig(r=2, n_up=1, num_tasks=4, lambda_type="full")
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="rank"):
        AdapterConfig.from_dict({**cfg.to_dict(), "rank": 3})
