"""`adrel train`: train MTL-LoRA relevance classifiers on Ray Train, tracked in MLflow.

    adrel train --config jobs/presets/demo.yaml [--set optim.lr=1e-3 ...]
                [--address ray://head:10001] [--run-name NAME]
    adrel train --add-task NAME --from URI --data DIR [--out DIR] [--train-shared]

Onboarding (--add-task) extends a trained multi-task model with one task by training only
that task's Λ_t, w_t and head; the old tasks' outputs stay bit-identical.

Starting again with the same --run-name (and storage path) resumes from the run's last
checkpoint. Prints the MLflow run id and the final checkpoint path; exits non-zero with a
clear message on a bad config (every error listed), missing data, or a failed run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.cli import UserError
from jobs.runtime import cpu_count_arg


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train relevance classifiers on Ray Train (MLflow-tracked, resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (see jobs/presets/*.yaml)")
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
    p.add_argument(
        "--num-cpus", type=cpu_count_arg, help="CPUs of the local Ray cluster (local only)"
    )
    add_onboard_arguments(p)
    p.set_defaults(func=run)


def add_onboard_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--add-task` options of `adrel train` (onboarding a task onto a trained model)."""
    g = parser.add_argument_group("onboard a new task (train only its per-task parameters)")
    g.add_argument("--add-task", dest="add_task", metavar="NAME", help="name of the new task")
    g.add_argument(
        "--from",
        dest="from_uri",
        metavar="URI",
        help="trained model: checkpoint dir or MLflow URI (models:/name@alias, runs:/id/path)",
    )
    g.add_argument(
        "--data",
        dest="onboard_data",
        metavar="DIR",
        help="DIR/train/task=NAME (+ DIR/dev/task=NAME for model selection), or DIR/task=NAME",
    )
    g.add_argument(
        "--out",
        dest="onboard_out",
        metavar="DIR",
        help="where to write the extended checkpoint (default: <model>+<task>)",
    )
    g.add_argument(
        "--train-shared",
        action="store_true",
        help="also fine-tune shared parts (old tasks' outputs then change)",
    )
    g.add_argument("--onboard-max-rows", type=int, default=None, metavar="N")
    g.add_argument(
        "--onboard-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the onboarding training config, e.g. optim.lr=5e-4 (repeatable)",
    )


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
    if address:
        overrides.append(f"scaling.address={address}")
    try:
        # The run name as typed (--set would read 2026-11-29 as a date).
        cfg = load_config(config, overrides, {"run_name": run_name})
        preflight(cfg)  # data problems surface before a cluster is started
    except (ConfigError, DataError) as e:
        raise UserError(str(e)) from None
    started = ensure_ray(cfg.scaling.address, num_cpus=num_cpus, state_api=True)
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
    if args.add_task is not None:  # an empty name is refused by name, below
        if args.config or args.overrides:
            raise UserError("--add-task takes --from/--data/--onboard-set, not --config/--set")
        return onboard(args)
    if not args.config:
        raise UserError(
            "adrel train needs --config FILE (or --add-task NAME --from URI --data DIR)"
        )
    result = train(args.config, args.overrides, args.address, args.run_name, args.num_cpus)
    print(result.summary())
    print(f"MLFLOW_RUN_ID={result.mlflow_run_id or ''}")
    print(f"CHECKPOINT={result.checkpoint_path}")
    return 0


def onboard(args: argparse.Namespace) -> int:
    """`adrel train --add-task`: resolve the model, onboard the task, print a JSON summary."""
    import json
    import tempfile

    from pipeline.onboard import add_task, resolve_checkpoint

    missing = [f for f, v in (("--from", args.from_uri), ("--data", args.onboard_data)) if not v]
    if missing:
        raise UserError(f"--add-task needs {' and '.join(missing)}")
    if not Path(args.onboard_data).is_dir():
        raise UserError(f"--data {args.onboard_data}: no such directory")
    out = args.onboard_out or f"{Path(str(args.from_uri)).name or 'model'}+{args.add_task}"
    try:
        with tempfile.TemporaryDirectory(prefix="adrel-onboard-") as tmp:
            ckpt = resolve_checkpoint(args.from_uri, Path(tmp))
            report = add_task(
                ckpt,
                args.add_task,
                args.onboard_data,
                out,
                overrides=args.onboard_set,
                train_shared=args.train_shared,
                max_rows=args.onboard_max_rows,
            )
    except ValueError as e:  # OnboardError, ConfigError, ModelURIError, a bad task name
        raise UserError(str(e)) from None
    summary = {k: v for k, v in report.to_dict().items() if k != "history"}
    print(json.dumps(summary, indent=2))
    print(f"CHECKPOINT={report.out_dir}")
    return 0
