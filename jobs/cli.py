"""The `adrel` command line. Each subcommand lives in its own jobs/<name>.py module.

A command module defines `register(subparsers)`, which adds its parser(s) and sets
`func(args) -> int` (the exit code). Jobs are thin: parse, build config, call library code.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

# Order is the order of `adrel --help`. Modules not present in this build are skipped.
COMMAND_MODULES = (
    "demo",
    "data",
    "train",
    "export",
    "registry",
    "evaluate",
    "score",
    "serve",
    "retrain",
)


class UserError(Exception):
    """An error the user can act on: printed without a traceback, exit code 2 by default."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adrel",
        description="Ads relevance on MTL-LoRA: ingest, train, evaluate, export, score, serve.",
    )
    parser.add_argument("--version", action="version", version=f"adrel {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"jobs.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"jobs.{name}":
                continue
            raise
        mod.register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a command stops as on Ctrl-C (its cleanup runs:
    staging folders removed, Ray shut down) and exits 143."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    from jobs.runtime import set_env_defaults

    set_env_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        return _run(args)
    finally:
        if in_main:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"adrel {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, KeyError) as e:
        # Library code raises these with actionable messages (bad config, bad input, paths).
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"adrel {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:
        code = _mlflow_exit_code(e)
        if code is None:
            raise
        # MLflow's own message names the URI, model or run (e.g. an unsupported URI scheme).
        print(f"adrel {args.command}: error: MLflow: {e}", file=sys.stderr)
        return code
    except Terminated:
        print(f"adrel {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"adrel {args.command}: interrupted", file=sys.stderr)
        return 130


# MLflow error codes that mean the request was wrong (exit 2), not the service (exit 1).
MLFLOW_BAD_REQUEST = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}


def _mlflow_exit_code(e: Exception) -> int | None:
    """2 or 1 for an MlflowException (a bad request, or anything else), None otherwise."""
    exceptions = sys.modules.get("mlflow.exceptions")  # only if something loaded MLflow
    if exceptions is None or not isinstance(e, exceptions.MlflowException):
        return None
    return 2 if getattr(e, "error_code", None) in MLFLOW_BAD_REQUEST else 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adrel")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
