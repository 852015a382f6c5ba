"""`adrel demo`: the whole pipeline on synthetic ads data and embedded defaults.

Generates a synthetic multi-task ads data set (split by query into train/dev/holdout) and an
unlabelled inventory, runs `adrel retrain` on it (local Ray, MLflow on sqlite under the
workdir, MiniLM-L6), which batch-scores the inventory with the new champions, and prints
where everything is. Running it again reuses the data and the registry: the second retrain
competes with the first one's champions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.cli import UserError

PRESETS = {"demo": "retrain-demo.yaml", "tiny": "retrain-tiny.yaml"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on synthetic data and embedded defaults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir", default="adrel-work", help="where data, runs, MLflow and outputs go"
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="demo: MiniLM-L6 (a few minutes); tiny: a tiny random encoder (CI-sized)")  # fmt: skip
    p.add_argument("--rows-per-task", type=int, default=None,
                   help="synthetic pairs per task before the split (default: 1200 demo, 300 tiny)")  # fmt: skip
    p.add_argument("--inventory-rows", type=int, default=None, help="inventory pairs per task")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a retrain config value (repeatable)")  # fmt: skip
    p.set_defaults(func=run)


def make_data(workdir: Path, rows_per_task: int, inventory_rows: int) -> dict[str, Path]:
    """Synthetic labelled data split by query (no query in two splits) + an inventory."""
    from features.split import split_dir
    from features.synth import generate

    data = workdir / "data"
    roots = {s: data / "synth" / s for s in ("train", "dev", "holdout")}
    roots["inventory"] = data / "inventory"
    if all(p.is_dir() for p in roots.values()):
        return roots  # the same seed gives the same bytes: reuse what the first run made
    # Otherwise (a first run, or one stopped part-way) make it all again: these folders are
    # the demo's own.
    summary = generate(data / "raw", rows_per_task, seed=0, overwrite=True)
    counts = split_dir(data / "raw", data / "split", fractions=(0.6, 0.15, 0.25), overwrite=True)
    for split, name in (("train", "train"), ("dev", "dev"), ("test", "holdout")):
        if not roots[name].exists():
            roots[name].parent.mkdir(parents=True, exist_ok=True)
            (data / "split" / split).rename(roots[name])
    generate(roots["inventory"], inventory_rows, seed=1, with_labels=False, overwrite=True)
    agree = {k: v for k, v in summary.items() if "agree" in k or "disagree" in k}
    print(f"synthetic data: {json.dumps(counts)}; task agreement: {json.dumps(agree, default=str)}")
    return roots


def _demo_run_number(retrain_dir: Path) -> int:
    """The run to do: the last demo run again when it did not finish (it resumes), else the
    next one (it competes with the champion the earlier runs left)."""
    runs = {}
    for d in retrain_dir.glob("demo-*") if retrain_dir.is_dir() else []:
        suffix = d.name.removeprefix("demo-")
        if suffix.isdigit():
            runs[int(suffix)] = d
    if not runs:
        return 1
    last = max(runs)
    state = runs[last] / "state.json"
    try:
        finished = bool(json.loads(state.read_text()).get("finished"))
    except (OSError, ValueError):
        finished = False
    return last + 1 if finished else last


def run(args: argparse.Namespace) -> int:
    from jobs.retrain import retrain
    from pipeline.config import preset_dir
    from pipeline.retrain import EXIT_FAILED

    workdir = Path(args.workdir).resolve()
    tiny = args.preset == "tiny"
    rows = args.rows_per_task or (300 if tiny else 1200)
    inv_rows = args.inventory_rows or (200 if tiny else 2500)
    if rows < 40:
        raise UserError(f"--rows-per-task must be >= 40, got {rows}")
    roots = make_data(workdir, rows, inv_rows)
    n = _demo_run_number(workdir / "retrain")
    overrides = [
        f"workdir={workdir}",
        f"data.train_root={roots['train']}",
        f"data.dev_root={roots['dev']}",
        f"data.holdout_root={roots['holdout']}",
        f"inventory.input={roots['inventory']}",
        f"inventory.output={workdir / 'scored'}",
        f"train.seed={n - 1}",  # a second demo run trains a different challenger
        *args.overrides,
    ]
    result = retrain(preset_dir() / PRESETS[args.preset], overrides, run_name=f"demo-{n}")
    if result.exit_code == EXIT_FAILED:
        return result.exit_code
    _print_where(workdir, result)
    return result.exit_code


def _print_where(workdir: Path, result) -> None:
    from jobs.runtime import default_artifact_root, default_tracking_uri
    from pipeline.registry import list_models

    uri = default_tracking_uri(workdir)
    ev = result.outputs.get("evaluate", {})
    score = result.outputs.get("score", {})
    print("\nper-task holdout ROC-AUC (challenger):")
    for task, auc in sorted(ev.get("holdout_auc", {}).items()):
        print(f"  {task:<16} {auc:.4f}" if auc is not None else f"  {task:<16} -")
    print("\nwhere everything is:")
    print(f"  evaluation report : {ev.get('report')}")
    print(f"  scored inventory  : {score.get('output', score.get('skipped'))}")
    print(f"  exports           : {result.outputs.get('export', {}).get('dir')}")
    print("  registered models :")
    for m in list_models(tracking_uri=uri):
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(m.get("aliases", {}).items()))
        versions = ",".join(v["version"] for v in m["versions"])
        print(f"    {m['name']:<24} versions {versions:<8} {aliases}")
    print(f"  MLflow UI         : mlflow ui --backend-store-uri {uri} "
          f"--default-artifact-root {default_artifact_root(workdir)}")  # fmt: skip
