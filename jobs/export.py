"""`adrel export`: merged per-task ONNX models, parity-gated, optionally int8 and registered.

    adrel export --model URI --out DIR [--tasks a,b] [--quantize int8]
                 [--validation DIR] [--max-auc-drop 0.005] [--int8-recipe NAME]
                 [--register] [--prefix adrel]

--model: a checkpoint directory, runs:/<id>/<path>, models:/<name>/<version>,
models:/<name>/latest or models:/<name>@<alias> (tracking URI: --tracking-uri, else
MLFLOW_TRACKING_URI, else the sqlite store under --workdir, as in training).

Exit codes: 0 published; 2 bad arguments or input; 3 a gate refused (parity or int8 AUC):
nothing is published then.
"""

from __future__ import annotations

import argparse

from jobs.cli import UserError
from jobs.runtime import DEFAULT_WORKDIR

GATE_EXIT = 3


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export merged per-task ONNX models (parity-gated), optionally int8 and registered",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint dir or MLflow model URI")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--tasks", help="comma-separated subset of the checkpoint's tasks")
    p.add_argument("--quantize", choices=["int8"], help="also build an int8 variant (AUC-guarded)")
    p.add_argument(
        "--max-auc-drop",
        type=float,
        default=0.005,
        help="largest validation ROC-AUC loss int8 may have (default 0.005)",
    )
    p.add_argument("--validation", help="labelled rows, ROOT/task=<name>/*.parquet (for int8)")
    p.add_argument(
        "--int8-recipe",
        help="int8 quantization recipe (pipeline.export.INT8_RECIPES; default: its "
        "DEFAULT_INT8_RECIPE, per_channel_matmul)",
    )
    p.add_argument("--register", action="store_true", help="register each task in MLflow")
    p.add_argument("--prefix", default="adrel", help="registered-model name prefix")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: env, else workdir)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="work directory (default store)")
    p.set_defaults(func=run)


def _tasks(value: str | None) -> list[str] | None:
    if not value:
        return None
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--tasks {value!r} names no task")
    return tasks


def run(args: argparse.Namespace) -> int:
    from jobs.runtime import tracking_uri
    from models.config import ConfigError
    from pipeline.export import (
        DEFAULT_INT8_RECIPE,
        ExportConfig,
        ExportError,
        OutputError,
        check_out,
        export_checkpoint,
    )
    from pipeline.model_uri import ModelURIError, find_payload, resolve_model

    turi = tracking_uri(args.workdir, args.tracking_uri)
    try:
        cfg = ExportConfig(
            tasks=_tasks(args.tasks),
            quantize=args.quantize,
            max_auc_drop=args.max_auc_drop,
            validation=args.validation,
            int8_recipe=args.int8_recipe or DEFAULT_INT8_RECIPE,
            source=str(args.model),
        )
        resolved = resolve_model(args.model, tracking_uri=turi)
        ckpt = find_payload(resolved.path, "adapter.safetensors")
        check_out(args.out, ckpt)
        if args.register:  # before the export, not after it
            _check_registry(args.prefix, turi)
    except (ConfigError, ModelURIError, OutputError) as e:
        raise UserError(str(e)) from None
    cfg.source_info = {
        "name": resolved.name,
        "version": resolved.version,
        "run_id": resolved.run_id,
    }
    try:
        result = export_checkpoint(ckpt, args.out, cfg)
    except (ConfigError, OutputError) as e:
        raise UserError(str(e)) from None
    except ExportError as e:
        raise UserError(f"{e}\nnothing was published to {args.out}", GATE_EXIT) from None
    print(result.summary())
    if args.register:
        _register(args, result.out_dir, ckpt, resolved, turi)
    return 0


def _check_registry(prefix: str, turi: str) -> None:
    """The prefix is valid and the tracking store answers (a sqlite store is made if new)."""
    from mlflow.tracking import MlflowClient

    from pipeline.registry import RegistryError, check_prefix

    try:
        check_prefix(prefix)
        MlflowClient(tracking_uri=turi, registry_uri=turi).search_registered_models(max_results=1)
    except RegistryError as e:
        raise UserError(str(e)) from None
    except Exception as e:
        raise UserError(f"--register: the MLflow store at {turi} cannot be used: {e}") from None


def _register(args, out_dir, ckpt, resolved, turi: str) -> None:
    """The checkpoint as `<prefix>-mtl` (unless it came from there) and each task model."""
    from pipeline.registry import mtl_model_name, register_checkpoint, register_export

    try:
        run_id = resolved.run_id
        if resolved.name != mtl_model_name(args.prefix):
            mtl = register_checkpoint(ckpt, run_id=run_id, prefix=args.prefix, tracking_uri=turi)
            run_id = mtl.run_id
            print(f"checkpoint: {mtl.name} version {mtl.version}")
        versions = register_export(
            out_dir, prefix=args.prefix, tracking_uri=turi, source_run_id=run_id
        )
    except Exception as e:  # the export stands; only the registry step failed
        raise UserError(
            f"exported to {out_dir}, but registering in MLflow ({turi}) failed: {e}", 1
        ) from e
    for task, rv in versions.items():
        print(f"registered {rv.name} version {rv.version} (alias challenger) for task {task}")
