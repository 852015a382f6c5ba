"""The Ray-free training loop on in-memory arrays: learning, exact resume, accumulation,
schedules, no-decay groups, early stopping, best-state selection."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from features.tasks import TaskRegistry
from features.tokenize import PairTokenizer
from models.checkpoint import build_model, load_trainable
from pipeline.config import build_config
from pipeline.train_loop import (
    Callback,
    TrainLoop,
    dev_metrics,
    lr_lambda,
    param_groups,
    set_seed,
    total_steps,
)

WORDS = [
    "red",
    "blue",
    "green",
    "shoe",
    "boot",
    "hat",
    "lamp",
    "desk",
    "chair",
    "sofa",
    "phone",
    "cable",
    "river",
    "hill",
    "apple",
    "pear",
]
# Each task has its own idea of relevance: the ad mentions one of the task's words.
TASK_WORDS = {"colours": ["red", "blue"], "furniture": ["lamp", "desk"]}


@pytest.fixture(autouse=True)
def _one_thread():
    # Two OpenMP threads on a busy 2-core box are ~30x slower than one.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def toy_arrays(tokenizer_dir, rows_per_task: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tok = PairTokenizer(tokenizer_dir, 32, pad_to_max=True)
    parts = []
    for tid, pos in enumerate(TASK_WORDS.values()):
        neg = [w for w in WORDS if w not in pos]
        labels = rng.random(rows_per_task) < 0.5
        queries = [" ".join(rng.choice(WORDS, 2)) for _ in labels]
        titles = [
            " ".join([*rng.choice(pos, 1), *rng.choice(WORDS, 2)])
            if y
            else " ".join(rng.choice(neg, 3))
            for y in labels
        ]
        enc = tok.encode(queries, titles)
        enc["task_id"] = np.full(rows_per_task, tid, dtype=np.int64)
        enc["label"] = labels.astype(np.float32)
        enc["weight"] = np.ones(rows_per_task, dtype=np.float32)
        parts.append(enc)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def data(tiny_encoder_dir):
    return toy_arrays(tiny_encoder_dir, 160, 0), toy_arrays(tiny_encoder_dir, 60, 1)


def make_cfg(enc, *overrides):
    return build_config(
        {"data": {"train_root": "unused", "dev_root": "unused"}},
        [
            f"model.base_model={enc}",
            "model.head_dropout=0.0",
            "model.adapter.r=4",
            "optim.lr=3e-3",
            "optim.batch_size=16",
            "optim.max_steps=40",
            "optim.warmup_steps=2",
            "eval.every_steps=20",
            "checkpoint.every_steps=10",
            "tracking.log_every_steps=1",
            *overrides,
        ],
    )


def make_model(cfg):
    set_seed(cfg.seed)
    return build_model(
        cfg.model.base_model,
        cfg.model.adapter.to_adapter_config(len(TASK_WORDS)),
        TaskRegistry(TASK_WORDS),
        cfg.model.pooling,
        cfg.model.head_dropout,
    )


def no_dropout(model):
    # The encoder's own dropout (hidden/attention, active in train mode) draws different
    # masks for one batch of 16 and two of 8.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None):
        self.losses: dict[int, float] = {}
        self.evals: list[tuple[int, dict, bool]] = []
        self.checkpoints: list[int] = []
        self.states: dict[int, bytes] = {}
        self.started = self.ended = 0
        self.stop_at = stop_at

    def on_train_start(self, loop):
        self.started += 1

    def on_log(self, loop, step, logs):
        self.losses[step] = logs["train/loss"]

    def on_eval(self, loop, step, metrics, improved):
        self.evals.append((step, metrics, improved))

    def on_checkpoint(self, loop, step):
        self.checkpoints.append(step)
        buf = io.BytesIO()
        torch.save(loop.state_dict(), buf)
        self.states[step] = buf.getvalue()
        if step == self.stop_at:
            raise KeyboardInterrupt("simulated crash")

    def on_train_end(self, loop, result):
        self.ended += 1


def test_learns_both_tasks_and_selects_best(data, tiny_encoder_dir):
    train, dev = data
    cfg = make_cfg(tiny_encoder_dir, "optim.max_steps=100")
    rec = Recorder()
    loop = TrainLoop(make_model(cfg), train, dev, cfg, callbacks=[rec], log=None)
    res = loop.run()
    assert res.step == 100 and res.start_step == 0 and not res.stopped_early
    assert [s for s, _, _ in rec.evals] == [20, 40, 60, 80, 100]
    # None at the last step: on_train_end covers it.
    assert rec.checkpoints == list(range(10, 100, 10))
    assert rec.started == rec.ended == 1
    final = rec.evals[-1][1]
    for task in TASK_WORDS:
        assert final[f"dev/auc/{task}"] > 0.7, final
    first = np.mean([rec.losses[s] for s in range(1, 6)])
    last = np.mean([rec.losses[s] for s in range(96, 101)])
    assert last < first - 0.01
    # The best state is the one that scored best_metric on dev.
    best = max(m["dev/macro_auc"] for _, m, _ in rec.evals)
    assert res.best_metric == pytest.approx(best)
    load_trainable(loop.module, loop.best_state)
    assert loop.evaluate()["dev/macro_auc"] == pytest.approx(best, abs=1e-6)
    assert res.timing["steps"] == 100 and res.timing["examples"] == 100 * 16
    assert res.timing["data_s"] < res.timing["fwd_bwd_s"]


def test_resume_continues_exactly(data, tiny_encoder_dir):
    # Dropout on: the resumed run must also restore the torch RNG, not only sampler/optimizer.
    train, dev = data
    over = (
        "optim.max_steps=16",
        "checkpoint.every_steps=6",
        "model.adapter.dropout=0.1",
        "model.head_dropout=0.1",
        "eval.every_steps=8",
        "optim.schedule=cosine",
    )
    cfg = make_cfg(tiny_encoder_dir, *over)
    ref = Recorder()
    ref_loop = TrainLoop(make_model(cfg), train, dev, cfg, callbacks=[ref], log=None)
    ref_loop.run()

    crashed = Recorder(stop_at=6)
    with pytest.raises(KeyboardInterrupt):
        TrainLoop(make_model(cfg), train, dev, cfg, callbacks=[crashed], log=None).run()
    state = torch.load(io.BytesIO(crashed.states[6]), weights_only=True)
    assert state["step"] == 6

    cfg2 = make_cfg(tiny_encoder_dir, *over, "seed=123")  # a fresh process: other init
    resumed = Recorder()
    loop = TrainLoop(make_model(cfg2), train, dev, cfg, callbacks=[resumed], log=None)
    loop.load_state_dict(state)
    res = loop.run()
    assert res.start_step == 6 and res.step == 16
    assert sorted(resumed.losses) == list(range(7, 17))  # no step repeated, none skipped
    for s in range(7, 17):
        assert resumed.losses[s] == pytest.approx(ref.losses[s], rel=1e-5, abs=1e-6)
    for k, v in ref_loop.trainable_state().items():
        torch.testing.assert_close(loop.trainable_state()[k], v, rtol=1e-5, atol=1e-6)
    assert res.best_metric == pytest.approx(ref_loop.best_metric)


def test_grad_accumulation_matches_one_big_batch(data, tiny_encoder_dir):
    # Same rows, same gradients: compare Adam's first moments (a running mean of the
    # gradients) at a negligible lr, since Adam's normalised update amplifies float noise.
    train, _ = data
    common = ("optim.max_steps=3", "optim.lr=1e-12", "optim.grad_clip=0")
    big = make_cfg(tiny_encoder_dir, *common, "optim.batch_size=16")
    acc = make_cfg(tiny_encoder_dir, *common, "optim.batch_size=8", "optim.grad_accum=2")
    a = TrainLoop(no_dropout(make_model(big)), train, None, big, log=None)
    b = TrainLoop(no_dropout(make_model(acc)), train, None, acc, log=None)
    a.run()
    b.run()
    assert b.timing["examples"] == a.timing["examples"] == 3 * 16
    moments = 0
    for pa, pb in zip(a.params, b.params):
        ma, mb = a.optimizer.state[pa]["exp_avg"], b.optimizer.state[pb]["exp_avg"]
        torch.testing.assert_close(mb, ma, rtol=1e-4, atol=1e-8)
        moments += int(ma.abs().sum() > 0)
    assert moments > len(a.params) // 2  # real gradients were compared, not zeros


def test_no_weight_decay_on_task_params_and_biases(tiny_encoder_dir):
    cfg = make_cfg(tiny_encoder_dir)
    model = make_model(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)].rsplit(".", 1)[-1] for p in decay["params"]}
    nn_ = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"lora_lambda", "lora_w", "head_bias"} <= nn_
    assert dn == {"lora_A", "lora_B", "head_weight"}
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == trainable
    # Behaviour: with no gradient signal, decay moves A but leaves λ (init 1) untouched.
    loop = TrainLoop(model, *[toy_arrays(tiny_encoder_dir, 8, 0)] * 2, cfg, log=None)
    for g in loop.optimizer.param_groups:
        g["lr"] = 0.5
    layer = next(iter(model.adapter_layers().values()))
    lam, a = layer.lora_lambda.detach().clone(), layer.lora_A.detach().clone()
    for p in loop.params:
        p.grad = torch.zeros_like(p)
    loop.optimizer.step()
    torch.testing.assert_close(layer.lora_lambda.detach(), lam)
    assert not torch.allclose(layer.lora_A.detach(), a)


def test_lr_schedules():
    lin = lr_lambda(total=10, warmup=2, schedule="linear", min_ratio=0.0)
    assert [round(lin(s), 4) for s in range(0, 3)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]
    assert lin(6) == pytest.approx(0.5) and lin(10) == 0.0
    cos = lr_lambda(total=10, warmup=0, schedule="cosine", min_ratio=0.1)
    assert (
        cos(0) == pytest.approx(1.0)
        and cos(5) == pytest.approx(0.55)
        and cos(10) == pytest.approx(0.1)
    )
    assert cos(3) > lin(3 + 2)  # cosine decays slowly at first


def test_total_steps_from_epochs(tiny_encoder_dir):
    cfg = make_cfg(tiny_encoder_dir, "optim.max_steps=null", "optim.epochs=2", "optim.grad_accum=2")
    # 2 epochs x 1000 rows / (16 x 2 x 2 workers) = 31.25 -> 32 steps
    assert total_steps(cfg, 1000, 2) == 32
    assert total_steps(make_cfg(tiny_encoder_dir), 1000, 2) == 40


def test_early_stopping(data, tiny_encoder_dir):
    train, dev = data
    cfg = make_cfg(
        tiny_encoder_dir,
        "optim.lr=1e-9",
        "eval.every_steps=4",
        "eval.patience=2",
        "eval.min_delta=0.01",
        "optim.max_steps=40",
    )
    rec = Recorder()
    res = TrainLoop(make_model(cfg), train, dev, cfg, callbacks=[rec], log=None).run()
    assert res.stopped_early and res.step == 12  # best at 4, no gain at 8 and 12
    assert [imp for _, _, imp in rec.evals] == [True, False, False]
    assert res.best_step == 4


def test_dev_metrics_per_task_and_macro():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n = 200
    task = np.repeat([0, 1, 2], [80, 80, 40])
    labels = (rng.random(n) < 0.5).astype(np.float32)
    labels[task == 2] = 1.0  # one class only: AUC undefined, excluded from the macro
    logits = (labels * 1.5 + rng.normal(size=n)).astype(np.float32)
    w = np.ones(n, dtype=np.float32)
    m = dev_metrics(logits, labels, w, task, ["a", "b", "c"])
    for t, name in enumerate("ab"):
        assert m[f"dev/auc/{name}"] == pytest.approx(
            roc_auc_score(labels[task == t], logits[task == t])
        )
    assert "dev/auc/c" not in m and "dev/loss/c" in m
    assert m["dev/macro_auc"] == pytest.approx((m["dev/auc/a"] + m["dev/auc/b"]) / 2)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert m["dev/loss"] == pytest.approx(bce.mean(), rel=1e-6)
    assert math.isfinite(m["dev/macro_loss"])


def test_bad_arrays_are_named(data, tiny_encoder_dir):
    train, dev = data
    cfg = make_cfg(tiny_encoder_dir)
    bad = {k: v for k, v in train.items() if k != "weight"}
    with pytest.raises(ValueError, match="train arrays lack columns \\['weight'\\]"):
        TrainLoop(make_model(cfg), bad, dev, cfg, log=None)
    short = {**dev, "label": dev["label"][:-1]}
    with pytest.raises(ValueError, match="dev columns differ in length"):
        TrainLoop(make_model(cfg), train, short, cfg, log=None)
