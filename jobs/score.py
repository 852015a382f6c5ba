"""`adrel score`: re-score a query–ad inventory with an exported model, on Ray Data.

    adrel score --model URI --input DIR --output DIR [--tasks a b] [--overwrite]
                [--batch-size N] [--actors N] [--address ADDR]

Exit codes: 0 scored and published; 2 bad input (a task without a model, an input file that
cannot be opened or has a reason/source_file/row_id column, output exists, bad option); 1 the
run failed (row conservation broken, a worker error): nothing published.
"""

from __future__ import annotations

import argparse

from jobs.runtime import cpu_count_arg

EPILOG = """\
model URIs: an export directory (index.json) or one task folder, models:/<name>@<alias> or
models:/<name>/<version> (one task model), models:/<prefix>@<alias> (that alias on every
<prefix>-<task> model, e.g. models:/adrel@champion), runs:/<run_id>/<path>.

output: OUTPUT/task=<name>/*.parquet (input columns + score, model_name, model_version),
OUTPUT/_quarantine/*.parquet (rows that failed validation, with reason), OUTPUT/_batch_score.json.
Written to a hidden staging folder next to OUTPUT and renamed into place at the end.

input columns named like output ones: an input column score, model_name or model_version (as
when re-scoring a previous result) is replaced by this run's values in the scored rows, and the
summary lists it as replaced; quarantined rows keep the input's. An input column named reason,
source_file or row_id (columns the run adds itself) is refused (exit 2, naming file and column).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="batch-score an inventory (DIR/task=<name>/*.parquet) with an exported model",
        description="Validate, tokenise and score every row with ONNX Runtime on a Ray Data "
        "actor pool; publish the scores and the quarantine at once, or nothing.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="export directory or models:/ URI")
    p.add_argument("--input", required=True, help="inventory: DIR/task=<name>/*.parquet")
    p.add_argument("--output", required=True, help="output directory (published atomically)")
    p.add_argument("--tasks", nargs="+", help="score only these task partitions (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result whole")
    p.add_argument("--batch-size", type=int, help="rows per ORT run (default: 128)")
    p.add_argument(
        "--block-rows",
        type=int,
        help="rows per actor call: one length-sorted bucket, one output file per task "
        "(default: 4096)",
    )
    p.add_argument("--actors", type=int, default=1, help="scoring actors (ORT sessions per task)")
    p.add_argument("--threads-per-actor", type=int, help="ORT threads (default: CPUs / actors)")
    p.add_argument(
        "--gpus-per-actor", type=float, help="GPUs per actor (default: 1 when there is a GPU)"
    )
    p.add_argument("--max-text-chars", type=int, help="longer text is quarantined (10000)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    p.add_argument(
        "--num-cpus", type=cpu_count_arg, help="CPUs of the local Ray cluster (default: all)"
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: env)")
    p.add_argument(
        "--progress-every", type=float, default=5.0, help="seconds between progress lines"
    )
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.set_defaults(func=run)


def _quiet_ray_data() -> None:
    """Our own progress lines replace Ray Data's (which log every few seconds off a TTY)."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> int:
    from jobs.cli import UserError
    from jobs.runtime import ensure_ray, shutdown_ray
    from pipeline.batch_score import (
        BatchScoreConfig,
        BatchScoreError,
        OutputExists,
        plan_scoring,
        remove_own_staging,
        score_inventory,
    )

    given = {
        "batch_size": args.batch_size,
        "block_rows": args.block_rows,
        "num_actors": args.actors,
        "num_gpus_per_actor": args.gpus_per_actor,
        "threads_per_actor": args.threads_per_actor,
        "max_text_chars": args.max_text_chars,
        "progress_every_s": args.progress_every,
    }
    cfg = BatchScoreConfig(**{k: v for k, v in given.items() if v is not None})
    try:  # input, output and model checked before a cluster starts
        planned = plan_scoring(
            args.model, args.input, args.output, args.tasks, args.overwrite, args.tracking_uri
        )
    except OutputExists as e:
        raise UserError(str(e)) from None
    started = ensure_ray(address=args.address, num_cpus=args.num_cpus)
    try:
        _quiet_ray_data()
        result = score_inventory(
            args.model,
            args.input,
            args.output,
            tasks=args.tasks,
            overwrite=args.overwrite,
            config=cfg,
            tracking_uri=args.tracking_uri,
            log=None if args.quiet else _log,
            planned=planned,
        )
    except OutputExists as e:
        raise UserError(str(e)) from None
    except BatchScoreError as e:
        raise UserError(str(e), exit_code=1) from None
    finally:
        if started:
            shutdown_ray()
            remove_own_staging(planned.output_dir)  # what actors wrote after a stop's cleanup
    if args.quiet:
        print(result.summary())
    return 0


def _log(line: str) -> None:
    print(line, flush=True)
