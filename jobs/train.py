"""`adrel train`: train MTL-LoRA relevance classifiers on Ray Train, tracked in MLflow.

    adrel train --config jobs/presets/demo.yaml [--set optim.lr=1e-3 ...]
                [--address ray://head:10001] [--run-name NAME]

Starting again with the same --run-name (and storage path) resumes from the run's last
checkpoint. Prints the MLflow run id and the final checkpoint path; exits non-zero with a
clear message on a bad config (every error listed), missing data, or a failed run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.cli import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train relevance classifiers on Ray Train (MLflow-tracked, resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config (see jobs/presets/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. optim.lr=1e-3 (repeatable)",
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--run-name", help="run name; an existing run of that name is resumed")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (local only)")
    p.set_defaults(func=run)


def train(
    config: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    address: str | None = None,
    run_name: str | None = None,
    num_cpus: int | None = None,
):
    """Load the config, start/connect Ray, train; returns pipeline.ray_train.TrainResult."""
    from jobs.runtime import ensure_ray, shutdown_ray
    from models.config import ConfigError
    from pipeline.config import load_config
    from pipeline.ray_train import DataError, TrainingFailed, preflight, run_training

    overrides = list(overrides)
    if run_name:
        overrides.append(f"run_name={run_name}")
    if address:
        overrides.append(f"scaling.address={address}")
    try:
        cfg = load_config(config, overrides)
        preflight(cfg)  # data problems surface before a cluster is started
    except (ConfigError, DataError) as e:
        raise UserError(str(e)) from None
    started = ensure_ray(cfg.scaling.address, num_cpus=num_cpus)
    try:
        return run_training(
            cfg, config_text=Path(config).read_text(), config_name=Path(config).name
        )
    except DataError as e:
        raise UserError(str(e)) from None
    except TrainingFailed as e:
        raise UserError(str(e), exit_code=1) from None
    finally:
        if started:
            shutdown_ray()


def run(args: argparse.Namespace) -> int:
    result = train(args.config, args.overrides, args.address, args.run_name, args.num_cpus)
    print(result.summary())
    print(f"MLFLOW_RUN_ID={result.mlflow_run_id or ''}")
    print(f"CHECKPOINT={result.checkpoint_path}")
    return 0
