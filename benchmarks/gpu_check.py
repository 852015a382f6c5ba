"""The GPU paths in one short run: a bf16 MTL-LoRA training step, ORT's CUDA provider, and the
serving load benchmark on the GPU.

    python benchmarks/gpu_check.py [--steps 10] [--load-requests 400] [--skip-load]

On MiniLM-L6 (the default encoder), on the first CUDA device:
  (1) training: `steps` AdamW steps of the MTL-LoRA classifier at batch 32, seq 64, under the
      bf16 autocast TrainLoop uses on CUDA; ms per step (after one warm-up step), the losses
      finite, and the bf16 loss of one batch against fp32 on the same weights;
  (2) scoring: the exported task model on ORT's CUDA provider (the Scorer's "cuda" choice,
      IO binding) against the CPU provider: max |Δ score| on 64 rows, and the median latency
      of one row and of 64 rows on each;
  (3) serving: benchmarks/bench_serving_load.py on the same export (one round), where batching
      should matter far more than on CPU: its JSON line.
Without a usable GPU it says so and exits 0. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def train_step_check(steps: int, device: str = "cuda") -> dict:
    import torch
    from bench_serving_load import make_items

    from features.tasks import TaskRegistry
    from features.tokenize import PairTokenizer
    from models.checkpoint import build_model
    from models.config import AdapterConfig
    from models.encoder import DEFAULT_ENCODER, resolve_encoder

    torch.manual_seed(0)
    enc = resolve_encoder(DEFAULT_ENCODER)
    tasks = TaskRegistry(["a", "b", "c", "d"])
    model = build_model(str(enc), AdapterConfig(num_tasks=4), tasks).to(device).train()
    items = make_items(32, seed=1)
    batch = PairTokenizer(enc, max_length=64, pad_to_max=True).encode(
        [x["query"] for x in items],
        [x["ad_title"] for x in items],
        [x["ad_description"] for x in items],
    )
    feed = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    task_ids = torch.arange(32, device=device) % 4
    labels = (torch.arange(32, device=device) % 2).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def loss_of(bf16: bool) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(
                feed["input_ids"], feed["attention_mask"], task_ids, feed["token_type_ids"]
            )
        return loss_fn(logits.float(), labels)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        l32, l16 = loss_of(False).item(), loss_of(True).item()
    losses, times = [], []
    for i in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(True)
        loss.backward()
        opt.step()
        sync()
        if i:  # the first step warms up kernels and the allocator
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {
        "train_bf16_ms_per_step_b32s64": round(statistics.median(times) * 1e3, 2),
        "train_losses_finite": all(map(lambda x: x == x and abs(x) < 1e4, losses)),
        "train_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "bf16_vs_fp32_loss_diff": round(abs(l16 - l32), 5),
    }


def scorer_check(export: Path, providers: str = "cuda") -> dict:
    import numpy as np
    from bench_serving_load import make_items

    from serving.scorer import CUDA, load_scorers

    gpu = next(iter(load_scorers(export, providers=providers).values()))
    cpu = next(iter(load_scorers(export, providers="cpu").values()))
    items = make_items(64, seed=2)
    cols = (
        [x["query"] for x in items],
        [x["ad_title"] for x in items],
        [x["ad_description"] for x in items],
    )

    def median_ms(scorer, rows: int, n: int = 30) -> float:
        args = [c[:rows] for c in cols]
        for _ in range(3):
            scorer.score(*args)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            scorer.score(*args)
            ts.append(time.perf_counter() - t0)
        return round(statistics.median(ts) * 1e3, 2)

    return {
        "ort_cuda_provider": gpu.providers[0] == CUDA,
        "ort_cuda_vs_cpu_max_abs_score_diff": float(
            np.abs(gpu.score(*cols) - cpu.score(*cols)).max()
        ),
        "ort_cuda_ms_b1": median_ms(gpu, 1),
        "ort_cuda_ms_b64": median_ms(gpu, 64),
        "ort_cpu_ms_b1": median_ms(cpu, 1),
        "ort_cpu_ms_b64": median_ms(cpu, 64, n=5),
    }


def load_check(export: Path, requests: int) -> dict:
    script = Path(__file__).resolve().parent / "bench_serving_load.py"
    cmd = [sys.executable, str(script), "--model", str(export), "--requests", str(requests)]
    cmd += ["--rounds", "1", "--time-limit", "10"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode or not lines:
        return {"serving_load_error": (res.stderr or res.stdout)[-2000:]}
    return {"serving_load": json.loads(lines[-1])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="bf16 training steps to time")
    ap.add_argument("--load-requests", type=int, default=400, help="requests per load phase")
    ap.add_argument("--skip-load", action="store_true", help="leave out the serving load run")
    ap.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="run (1) and (2) on CPU (2 steps, CPU provider twice): checks this script, not a GPU",
    )
    args = ap.parse_args(argv)

    from jobs.runtime import set_env_defaults

    set_env_defaults()
    import torch

    from serving.scorer import cuda_usable

    if args.dry_run_cpu:
        from bench_serving_load import build_export

        out = {"gpu": None, "dry_run_cpu": True, **train_step_check(2, "cpu")}
        with tempfile.TemporaryDirectory(prefix="adrel-gpu-check-") as tmp:
            out.update(scorer_check(build_export(Path(tmp)), "cpu"))
        print(json.dumps(out))
        return out
    if not (torch.cuda.is_available() and cuda_usable()):
        out = {
            "gpu": None,
            "reason": "no usable CUDA device (torch and onnxruntime-gpu both need one)",
        }
        print(json.dumps(out))
        return out
    out: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    t0 = time.perf_counter()
    out.update(train_step_check(args.steps))
    from bench_serving_load import build_export

    with tempfile.TemporaryDirectory(prefix="adrel-gpu-check-") as tmp:
        export = build_export(Path(tmp))
        out.update(scorer_check(export))
        if not args.skip_load:
            out.update(load_check(export, args.load_requests))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
