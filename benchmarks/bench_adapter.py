"""Train-step cost of the MTL-LoRA layer vs PEFT LoRA vs the per-example bmm formulation.

MiniLM-L6, batch 32, seq 64, 4 tasks mixed in every batch, r = 8, n = 3, the same target
modules for all. Steps are interleaved round-robin so the three share machine conditions.
Last line: one JSON object.

    python benchmarks/bench_adapter.py [--steps 8] [--warmup 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from features.tasks import TaskRegistry
from jobs.runtime import set_env_defaults
from models.adapters import ADAPTERS, MTLLoRALinear
from models.checkpoint import build_model
from models.classifier import pool
from models.config import DEFAULT_TARGETS, AdapterConfig
from models.encoder import DEFAULT_ENCODER, load_encoder
from models.merge import merge_task

B, S, T = 32, 64, 4


class PerExampleBmmLinear(MTLLoRALinear):
    """The authors' formulation: build B_t for every example, then bmm (for comparison only)."""

    def adapter_delta(self, x, task_ids):
        z = torch.nn.functional.linear(self.drop(x), self.lora_A)  # (B, S, r)
        z = z * self.lora_lambda.index_select(0, task_ids).unsqueeze(1)
        mix = self.mixing().index_select(0, task_ids)  # (B, n)
        B_t = torch.einsum("bn,nor->bor", mix, self.lora_B)  # (B, d_out, r): one per example
        return torch.bmm(z, B_t.transpose(1, 2)) * self.cfg.scaling


class PeftClassifier(nn.Module):
    """PEFT LoRA encoder + the same pooling and gathered per-task heads as ours."""

    def __init__(self, r: int):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        enc = load_encoder(DEFAULT_ENCODER)
        cfg = LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS))
        self.encoder = get_peft_model(enc, cfg)
        self.head_weight = nn.Parameter(torch.randn(T, enc.config.hidden_size) * 0.02)
        self.head_bias = nn.Parameter(torch.zeros(T))

    def forward(self, input_ids, attention_mask, task_ids, token_type_ids=None):
        h = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        pooled = pool(h.last_hidden_state, attention_mask, "mean")
        return (pooled * self.head_weight[task_ids]).sum(-1) + self.head_bias[task_ids]


def make_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    types = torch.zeros(B, S, dtype=torch.long)
    types[:, S // 2 :] = 1
    task_ids = torch.arange(B) % T  # 4 tasks mixed in every batch
    labels = torch.randint(0, 2, (B,), generator=g).float()
    return ids, mask, types, task_ids, labels


def make_step(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch) -> float:
        ids, mask, types, task_ids, labels = batch
        t0 = time.perf_counter()
        logits = model(ids, mask, task_ids, types)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def ours(variant: str):
    cfg = AdapterConfig(variant=variant, r=8, n_up=3, num_tasks=T)
    model = build_model(
        DEFAULT_ENCODER, cfg, TaskRegistry([f"t{i}" for i in range(T)]), head_dropout=0.0
    )
    return model.train()


def merge_diff() -> float:
    torch.manual_seed(0)
    model = ours("mtl_lora").eval()
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_(std=0.02)
            layer.lora_lambda.add_(torch.randn_like(layer.lora_lambda) * 0.3)
            layer.lora_w.normal_(std=1.0)
    ids, mask, types, _, _ = make_batch(99)
    worst = 0.0
    with torch.no_grad():
        for t in range(T):
            ref = model(ids, mask, torch.full((B,), t), types)
            out = merge_task(model, t)(ids, mask, types)
            worst = max(worst, (out - ref).abs().max().item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_env_defaults()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ADAPTERS["mtl_lora_bmm"] = PerExampleBmmLinear
    steps = {
        "mtl_lora": make_step(ours("mtl_lora")),
        "peft_lora": make_step(PeftClassifier(r=8).train()),
        "per_example_bmm": make_step(ours("mtl_lora_bmm")),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        batch = make_batch(i)
        for name, step in steps.items():
            dt = step(batch)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'method':<18}{'median step s':>14}{'min':>8}{'max':>8}")
    for k, v in times.items():
        print(f"{k:<18}{med[k]:>14.3f}{min(v):>8.3f}{max(v):>8.3f}")
    diff = merge_diff()
    result = {
        "mtl_lora_step_s": round(med["mtl_lora"], 4),
        "peft_lora_step_s": round(med["peft_lora"], 4),
        "per_example_bmm_step_s": round(med["per_example_bmm"], 4),
        "ratio_vs_peft_lora": round(med["mtl_lora"] / med["peft_lora"], 3),
        "ratio_vs_per_example_bmm": round(med["mtl_lora"] / med["per_example_bmm"], 3),
        "merge_max_abs_diff": diff,
        "batch": B,
        "seq": S,
        "tasks": T,
        "threads": args.threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
