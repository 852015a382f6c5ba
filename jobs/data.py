"""`adrel data`: validate a contract directory, generate synthetic data, split by query.

adrel data validate --input DIR --out DIR [--max-bad-fraction F] [--max-text-chars N]
adrel data synth --out DIR --rows-per-task N --seed S [--tasks ...] [--no-label] [--overwrite]
adrel data split --input DIR --out DIR [--fractions TRAIN DEV TEST] [--overwrite]

validate, synth and split refuse an --out that is not empty unless --overwrite, which replaces
the old result whole; they write next to --out and rename into place at the end, so a failed
or stopped run leaves --out as it was (features.output).
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="validate, generate or split query-ad Parquet data")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    v = sub.add_parser(
        "validate",
        help="check every row; write clean/ and quarantine/ (exit 2 when over the threshold "
        "or when a file cannot be opened)",
    )
    v.add_argument("--input", required=True, help="root with task=<name>/*.parquet")
    v.add_argument("--out", required=True, help="writes OUT/clean/task=*/, OUT/quarantine/")
    v.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="refuse (exit 2) above this quarantined share (default 0.01); a file that cannot be "
        "opened refuses the data whatever this is",
    )
    v.add_argument(
        "--max-text-chars",
        type=int,
        default=10_000,
        help="quarantine text longer than this (default 10000)",
    )
    v.add_argument(
        "--no-label", action="store_true", help="scoring input: rows need no label column"
    )
    v.add_argument("--tasks", nargs="+", default=None, help="known tasks; others are quarantined")
    v.add_argument("--overwrite", action="store_true", help="replace the validation result in OUT")
    v.set_defaults(func=run_validate)

    s = sub.add_parser("synth", help="write a realistic synthetic multi-task ads data set")
    s.add_argument("--out", required=True)
    s.add_argument(
        "--rows-per-task", type=int, required=True, help="at most 1000000 (about a minute)"
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tasks", nargs="+", default=None, help="subset of the synthetic tasks")
    s.add_argument(
        "--no-label", action="store_true", help="a scoring inventory: no label/grade columns"
    )
    s.add_argument("--files-per-task", type=int, default=2)
    s.add_argument("--noise", type=float, default=0.02, help="label flip rate per task")
    s.add_argument("--with-weight", action="store_true", help="add a weight column")
    s.add_argument("--overwrite", action="store_true", help="replace the data set in OUT")
    s.set_defaults(func=run_synth)

    sp = sub.add_parser("split", help="deterministic train/dev/test split by hash of the query")
    sp.add_argument("--input", required=True)
    sp.add_argument("--out", required=True, help="writes OUT/{train,dev,test}/task=*/")
    sp.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=(0.8, 0.1, 0.1),
        metavar=("TRAIN", "DEV", "TEST"),
    )
    sp.add_argument("--overwrite", action="store_true", help="replace the split in OUT")
    sp.set_defaults(func=run_split)


def run_validate(args: argparse.Namespace) -> int:
    from features.validate import ValidationConfig, validate_dir

    cfg = ValidationConfig(
        max_text_chars=args.max_text_chars,
        require_label=not args.no_label,
        known_tasks=args.tasks,
        max_bad_fraction=args.max_bad_fraction,
    )
    report = validate_dir(args.input, args.out, cfg, overwrite=args.overwrite)
    print(report.table())
    if report.over_threshold:
        raise UserError(report.message, exit_code=2)
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from features.synth import generate

    summary = generate(
        args.out,
        args.rows_per_task,
        args.seed,
        tasks=args.tasks,
        with_labels=not args.no_label,
        files_per_task=args.files_per_task,
        noise=args.noise,
        with_weight=args.with_weight,
        overwrite=args.overwrite,
    )
    for task, info in summary["tasks"].items():
        rate = "" if args.no_label else f"  positives {info['positive_rate']:.1%}"
        print(f"{task:<16} {info['rows']:>8} rows{rate}")
    if "disagreement" in summary:
        print(
            f"tasks disagree on {summary['disagreement']:.1%} of pairs; a task-blind model can "
            f"reach at most {summary['task_blind_ceiling']:.1%} accuracy"
        )
    print(f"wrote {args.out}")
    return 0


def run_split(args: argparse.Namespace) -> int:
    from features.split import split_dir

    counts = split_dir(args.input, args.out, args.fractions, overwrite=args.overwrite)
    print(json.dumps(counts, indent=2))
    return 0
