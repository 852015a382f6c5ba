"""`adrel promote` and `adrel models`: move the champion alias (recorded), list the registry.

    adrel promote --task T --version V [--reason TEXT] [--actor NAME] [--prefix adrel]
    adrel models [--prefix adrel] [--json]

`--task mtl` promotes the multi-task checkpoint model. Tracking URI: --tracking-uri, else
MLFLOW_TRACKING_URI, else the sqlite store under --workdir.
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import UserError
from jobs.runtime import DEFAULT_WORKDIR


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", default="adrel", help="registered-model name prefix")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: env, else workdir)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="work directory (default store)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "promote",
        help="point a task model's champion alias at a version (recorded)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, help="task name (or 'mtl' for the checkpoint model)")
    p.add_argument("--version", required=True, help="registered version number")
    p.add_argument("--reason", default="", help="why (stored with the promotion record)")
    p.add_argument("--actor", help="who (default: $ADREL_ACTOR, else the OS user)")
    _common(p)
    p.set_defaults(func=run_promote)

    m = subparsers.add_parser(
        "models",
        help="list registered adrel models with versions and aliases",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(m)
    m.set_defaults(func=run_models)


def run_promote(args: argparse.Namespace) -> int:
    from features.tasks import TaskNameError
    from jobs.runtime import tracking_uri
    from pipeline.registry import RegistryError, promote

    try:
        p = promote(
            args.task,
            args.version,
            reason=args.reason,
            actor=args.actor,
            prefix=args.prefix,
            tracking_uri=tracking_uri(args.workdir, args.tracking_uri),
        )
    except (RegistryError, TaskNameError) as e:
        raise UserError(str(e)) from None
    print(
        f"{p.name}: champion {p.from_version or '(none)'} -> {p.to_version} by {p.actor} at "
        f"{p.at}" + (f" ({p.reason})" if p.reason else "")
    )
    return 0


def run_models(args: argparse.Namespace) -> int:
    from jobs.runtime import tracking_uri
    from pipeline.registry import RegistryError, list_models

    try:
        models = list_models(args.prefix, tracking_uri(args.workdir, args.tracking_uri))
    except RegistryError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print(f"no registered models under prefix {args.prefix!r}")
        return 0
    for m in models:
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(m["aliases"].items())) or "no aliases"
        print(f"{m['name']}  [{m['kind'] or '?'}]  {aliases}")
        for v in m["versions"]:
            extra = f"  parity {v['parity']}" if v["parity"] else ""
            tags = f"  [{', '.join(v['aliases'])}]" if v["aliases"] else ""
            print(f"  v{v['version']:<4} {v['created']}  run {v['run_id'] or '-'}{extra}{tags}")
    return 0
