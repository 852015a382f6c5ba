"""`adrel evaluate`: offline evaluation report of a model (and champion-vs-challenger gates).

    adrel evaluate --model URI --data DIR --out DIR [--baseline URI] [--tasks a,b]
                   [--slice-column COL ...] [--gates key=value ...]

Exit codes: 0 every task passes its gates; 3 (EXIT_GATE_FAILED) at least one task fails a
gate (the report is still written: the retraining job and schedulers act on the code);
2 bad input (unknown task, missing data, invalid gate setting, unloadable model).
"""

from __future__ import annotations

import argparse
import re

EXIT_OK = 0
EXIT_GATE_FAILED = 3

EPILOG = """\
model URIs: a checkpoint directory, an export directory (index.json), models:/<name>@<alias>,
models:/<name>/<version>, runs:/<run_id>/<path>.

gates (--gates key=value, 'none' switches one off):
  max_roc_auc_drop=0.002 max_pr_auc_drop=0 max_ece_rise=0.01 max_log_loss_rise=none
  max_brier_rise=none use_ci=false | first model (no champion): min_roc_auc=0.6
  min_pr_auc=none max_ece=0.15 max_log_loss=none | absolute_always=false min_rows=1

exit codes: 0 all gates pass, 3 a gate failed (report written), 2 bad input.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="offline evaluation report; champion vs challenger gates (exit 3 when one fails)",
        description="Score the same labelled rows with a model (and its champion), write "
        "report.html, metrics.json and predictions.parquet, judge the release gates.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="the model to evaluate (the challenger)")
    p.add_argument("--data", required=True, help="labelled data: DIR/task=<name>/*.parquet")
    p.add_argument("--out", required=True, help="output directory for the report files")
    p.add_argument("--baseline", help="the model to compare against (typically the champion)")
    p.add_argument("--tasks", nargs="+", help="tasks to evaluate (default: all the model has)")
    p.add_argument(
        "--slice-column",
        dest="slice_columns",
        action="append",
        help="slice by this column or by a derived slice: query_length, has_description "
        "(repeatable; default: both derived slices)",
    )
    p.add_argument("--min-slice-size", type=int, default=50, help="smaller slices get no metrics")
    p.add_argument(
        "--gates",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="gate settings (listed below); repeatable",
    )
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="TASK=VALUE",
        help="decision threshold of a task for precision/recall/F1 (repeatable)",
    )
    p.add_argument("--threshold-data", help="dev data to choose F1-best thresholds on")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (0: no CIs)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--batch-size", type=int, default=64, help="scoring batch (checkpoints)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (checkpoints)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: env, else workdir)")
    p.add_argument("--workdir", default=None, help="work directory of the default MLflow store")
    p.add_argument("--mlflow-run-id", help="log into this run (default: the model's own run)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.cli import UserError
    from jobs.runtime import DEFAULT_WORKDIR, tracking_uri
    from pipeline.evaluate import EvalConfig, EvaluationError, evaluate
    from pipeline.gates import GateConfig, GateConfigError
    from pipeline.metrics import MetricConfig
    from pipeline.report import format_summary

    try:
        gates = GateConfig.from_overrides(args.gates)
        cfg = EvalConfig(
            tasks=_split(args.tasks),
            gates=gates,
            metrics=MetricConfig(n_boot=args.n_boot, seed=args.seed),
            **({"slice_columns": args.slice_columns} if args.slice_columns else {}),
            min_slice_size=args.min_slice_size,
            thresholds=_thresholds(args.threshold),
            threshold_data=args.threshold_data,
            batch_size=args.batch_size,
            device=_device(args.device),
            progress=not args.quiet,
            log_mlflow=not args.no_mlflow,
            tracking_uri=None
            if args.no_mlflow
            else tracking_uri(args.workdir or DEFAULT_WORKDIR, args.tracking_uri),
            mlflow_run_id=args.mlflow_run_id,
        )
    except (GateConfigError, EvaluationError, ValueError) as exc:
        raise UserError(str(exc)) from None
    try:
        result = evaluate(args.model, args.data, args.out, baseline=args.baseline, config=cfg)
    except EvaluationError as exc:
        raise UserError(str(exc)) from None
    print(format_summary(result.metrics))
    print(f"report:      {result.paths['report']}")
    print(f"metrics:     {result.paths['metrics']}")
    print(f"predictions: {result.paths['predictions']}")
    if "quarantine" in result.paths:
        print(f"quarantine:  {result.paths['quarantine']}")
    if result.mlflow_run_id:
        print(f"mlflow run:  {result.mlflow_run_id}")
    if result.gate_failed:
        print(f"gates: FAIL ({', '.join(result.failed_tasks)}); exit code {EXIT_GATE_FAILED}")
        return EXIT_GATE_FAILED
    print("gates: PASS")
    return EXIT_OK


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def _thresholds(items: list[str]) -> dict[str, float]:
    out, errors = {}, []
    for item in items:
        task, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[task.strip()] = float(value)
        except ValueError:
            errors.append(f"--threshold {item!r} is not TASK=NUMBER")
    if errors:
        raise ValueError("; ".join(errors))
    return out


def _device(name: str) -> str | None:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else None
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if m is None:
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(m[1] or 0) >= have:
            raise ValueError(f"--device {name!r}: this machine has {have} usable CUDA device(s)")
    return name
