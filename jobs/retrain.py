"""`adrel retrain`: the scheduled retraining job (validate, train, evaluate, export, register,
promote per task, optionally batch-score), resumable and locked per registry prefix.

    adrel retrain --config jobs/presets/retrain-demo.yaml [--run-name NAME] [--set key=value ...]

Exit codes: 0 success (every task promoted); 3 held (at least one task failed its gates, its
champion was kept); 1 failure (a stage failed; re-run the same --run-name to resume);
2 bad config; 75 another retrain with the same registry prefix is running.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import UserError
from jobs.runtime import cpu_count_arg


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "retrain",
        help="the scheduled retraining job, end to end (resumable, locked, gated promotion)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="retrain YAML (see jobs/presets/retrain-*.yaml)")
    p.add_argument("--run-name", help="run name; re-running a name resumes it (default: timestamp)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key (repeatable)")  # fmt: skip
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument(
        "--num-cpus", type=cpu_count_arg, help="CPUs of the local Ray cluster (local only)"
    )
    p.set_defaults(func=run)


def retrain(config, overrides=(), run_name=None, address=None, num_cpus=None, log=print):
    """Load the config, start/join Ray, run the job; returns pipeline.retrain.RetrainResult."""
    from jobs.runtime import ensure_ray, shutdown_ray
    from models.config import ConfigError
    from pipeline.lock import LockBusy
    from pipeline.retrain import EXIT_FAILED, EXIT_LOCKED, Retrain, StageFailed
    from pipeline.retrain_config import load_retrain_config

    try:
        cfg = load_retrain_config(config, list(overrides), {"run_name": run_name})
        job = Retrain(cfg, log=log)
        job.preflight()  # before Ray starts: missing inputs are a bad config, not a failed stage
    except ConfigError as e:
        raise UserError(str(e)) from None
    started = ensure_ray(address, num_cpus=num_cpus, state_api=True)
    try:
        return job.run()
    except LockBusy as e:
        raise UserError(str(e), exit_code=EXIT_LOCKED) from None
    except StageFailed as e:
        raise UserError(
            f"{e}\nre-run with the same --run-name to resume", exit_code=EXIT_FAILED
        ) from None
    finally:
        if started:
            shutdown_ray()


def run(args: argparse.Namespace) -> int:
    result = retrain(args.config, args.overrides, args.run_name, args.address, args.num_cpus)
    sys.stdout.flush()
    return result.exit_code
