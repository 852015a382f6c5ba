"""Offline evaluation: score the same held-out rows with a challenger (and its champion),
measure every task, judge the release gates, write the report, log it to MLflow.

    result = evaluate("models:/adrel-mtl@challenger", "data/holdout", "out/eval",
                      baseline="models:/adrel-mtl@champion")
    result.gate_failed, result.verdicts["exact"].reasons, result.paths["report"]

Outputs in `out_dir`: report.html (self-contained), metrics.json (every table figure),
predictions.parquet (row_id, task, label, score per model), quarantine.parquet (rows that
could not be evaluated, with `reason`; only when there are any).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from features.validate import RESERVED_COLUMNS
from pipeline.gates import GateConfig, TaskVerdict, judge
from pipeline.metrics import (
    BOOTSTRAP_METRICS,
    MACRO_KEYS,
    MetricConfig,
    best_f1_threshold,
    bootstrap,
    class_problem,
    ece,
    macro_average,
    macro_delta,
    point_metrics,
    pr_auc,
    query_groups,
    roc_auc,
)
from pipeline.predict import Predictor, load_predictor
from pipeline.tracking import artifact_location

log = logging.getLogger(__name__)

SCHEMA = "adrel-eval/1"
MODEL, BASELINE = "model", "baseline"
DERIVED_SLICES = ("query_length", "has_description")
DEFAULT_SLICES = DERIVED_SLICES
MAX_SLICE_VALUES = 20
DELTA_METRICS = BOOTSTRAP_METRICS  # paired deltas reported (and gated) per task
EXPERIMENT = "adrel-evaluation"


class EvaluationError(ValueError):
    """The evaluation cannot run as asked (no data, unknown task or column, …)."""


@dataclass
class EvalConfig:
    """Everything that shapes an evaluation besides the models and the data.

    tasks: tasks to evaluate (None: every task in the data the model knows).
    slice_columns: derived slices (query_length, has_description) or data column names.
    min_slice_size: slices with fewer rows are listed without metrics.
    thresholds: task -> score threshold for precision/recall/F1 (overrides model metadata).
    threshold_data: a dev directory (same layout) to choose F1-best thresholds on.
    batch_size / device: scoring of PyTorch checkpoints (device chosen by the job).
    progress: show a progress bar while scoring.
    log_mlflow / tracking_uri / mlflow_run_id / experiment: where results are logged
        (run: mlflow_run_id, else the model's own run, else a new run in `experiment`).
    """

    tasks: list[str] | None = None
    gates: GateConfig = field(default_factory=GateConfig)
    metrics: MetricConfig = field(default_factory=MetricConfig)
    slice_columns: list[str] = field(default_factory=lambda: list(DEFAULT_SLICES))
    min_slice_size: int = 50
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_data: str | None = None
    batch_size: int = 64
    device: str | None = None
    progress: bool = True
    log_mlflow: bool = True
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    experiment: str = EXPERIMENT
    artifact_path: str = "evaluation"

    def __post_init__(self) -> None:
        errors = []
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if isinstance(self.slice_columns, str):
            self.slice_columns = [self.slice_columns]
        self.slice_columns = list(self.slice_columns or [])
        if not isinstance(self.min_slice_size, int) or self.min_slice_size < 1:
            errors.append(f"min_slice_size must be an integer >= 1, got {self.min_slice_size!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            errors.append(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        for task, thr in (self.thresholds or {}).items():
            if not isinstance(thr, (int, float)) or not 0 <= thr <= 1:
                errors.append(f"threshold for task {task!r} must be in [0, 1], got {thr!r}")
        if errors:
            raise EvaluationError("invalid evaluation configuration: " + "; ".join(errors))


@dataclass
class EvalResult:
    """What an evaluation decided and where it wrote it."""

    verdicts: dict[str, TaskVerdict]
    metrics: dict
    paths: dict[str, Path]
    gate_failed: bool
    mlflow_run_id: str | None = None

    @property
    def failed_tasks(self) -> list[str]:
        return [t for t, v in self.verdicts.items() if not v.passed]


# ---------------------------------------------------------------------------- entry point


def evaluate(
    model: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    baseline: str | os.PathLike | None = None,
    tasks: list[str] | None = None,
    gates: GateConfig | None = None,
    slice_column: str | list[str] | None = None,
    thresholds: dict[str, float] | None = None,
    config: EvalConfig | None = None,
    **overrides,
) -> EvalResult:
    """Evaluate `model` (and `baseline`) on the labelled rows under `data_dir`.

    Keyword arguments override fields of `config` (see EvalConfig).
    """
    cfg = _config(config, tasks, gates, slice_column, thresholds, overrides)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"output {out} is a file, not a directory")
    started = time.time()

    data = load_eval_data(data_dir, cfg.tasks)  # first: bad data fails before models load
    challenger = load_predictor(model, cfg.tasks, cfg.batch_size, cfg.device, cfg.tracking_uri)
    # The champion may lack a task the challenger adds (a task onboarded since): load all of
    # its tasks; tasks it does not have are judged on the absolute bars.
    champion = (
        load_predictor(baseline, None, cfg.batch_size, cfg.device, cfg.tracking_uri)
        if baseline is not None
        else None
    )
    task_list = _select_tasks(cfg, data, challenger)
    unknown = sorted(set(cfg.thresholds) - set(task_list))
    if unknown:
        raise EvaluationError(
            f"threshold(s) given for task(s) {unknown}, which are not evaluated; "
            f"evaluated tasks: {task_list}"
        )
    rows, quarantine = data.rows, data.quarantine
    selected = rows["task"].isin(task_list).to_numpy()
    if not selected.all():  # valid rows of tasks the model does not have: kept, with the reason
        quarantine = pd.concat([quarantine, _quarantined(rows[~selected], "task_not_in_model")])
    rows = rows[selected].reset_index(drop=True)
    _check_slices(cfg.slice_columns, rows)

    predictors = {MODEL: challenger} | ({BASELINE: champion} if champion else {})
    scores = score_rows(rows, predictors, cfg.progress)
    thr = _thresholds(cfg, predictors, task_list)

    report_data = _measure(rows, scores, predictors, task_list, thr, cfg)
    report_data.update(
        schema=SCHEMA,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model=challenger.info.to_dict(),
        baseline=champion.info.to_dict() if champion else None,
        data={
            "dir": str(Path(data_dir).resolve()),
            "rows_read": data.rows_read,
            "rows_evaluated": len(rows),
            "rows_quarantined": len(quarantine),
            "quarantine_reasons": quarantine["reason"].value_counts().to_dict()
            if len(quarantine)
            else {},
            "skipped_tasks": _skipped(data, task_list, challenger),
        },
        config={
            "metrics": asdict(cfg.metrics),
            "gates": cfg.gates.to_dict(),
            "slice_columns": cfg.slice_columns,
            "min_slice_size": cfg.min_slice_size,
        },
        diagnostics=challenger.diagnostics(),
        elapsed_s=round(time.time() - started, 1),
    )
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails leaves no empty folder
    paths = _write_outputs(out, rows, scores, quarantine, report_data)
    verdicts = report_data.pop("_verdicts")
    result = EvalResult(
        verdicts=verdicts,
        metrics=_jsonable(report_data),
        paths=paths,
        gate_failed=any(not v.passed for v in verdicts.values()),
    )
    if cfg.log_mlflow:
        result.mlflow_run_id = log_to_mlflow(result, challenger, cfg, baseline)
    return result


def _config(config, tasks, gates, slice_column, thresholds, overrides) -> EvalConfig:
    base = asdict(config) if config else {}
    if config:
        base["gates"], base["metrics"] = config.gates, config.metrics
    for key, value in (
        ("tasks", tasks),
        ("gates", gates),
        ("slice_columns", slice_column),
        ("thresholds", thresholds),
    ):
        if value is not None:
            base[key] = value
    # MetricConfig fields (n_boot, seed, n_bins, …) are accepted as plain keywords too.
    metric_keys = set(MetricConfig.__dataclass_fields__)
    metric_over = {k: overrides.pop(k) for k in list(overrides) if k in metric_keys}
    unknown = sorted(set(overrides) - set(EvalConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"evaluate() got unknown option(s) {unknown}")
    base.update(overrides)
    if metric_over:
        base["metrics"] = replace(base.get("metrics") or MetricConfig(), **metric_over)
    return EvalConfig(**base)


# ---------------------------------------------------------------------------- data


@dataclass
class EvalData:
    rows: pd.DataFrame  # valid rows with row_id, task, query, ad_title, label, …
    quarantine: pd.DataFrame  # invalid rows with `reason`
    tasks: list[str]  # valid task names found
    rows_read: int


def load_eval_data(data_dir: str | os.PathLike, tasks: list[str] | None = None) -> EvalData:
    """Read `DIR/task=<name>/*.parquet`; split rows into valid ones and quarantined ones.

    Every row read gets a `row_id` (stable: task directory, file and row order), kept in both
    outputs, so predictions of two models and quarantined rows can be matched back.
    """
    from features.tasks import TaskNameError, check_task_name

    root = Path(data_dir)
    if not root.is_dir():
        raise EvaluationError(f"data directory {root} does not exist")
    parts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("task="))
    if not parts:
        raise EvaluationError(
            f"no task=<name> partitions under {root} (expected DIR/task=<name>/*.parquet)"
        )
    wanted = set(tasks) if tasks else None
    frames, next_id, found = [], 0, []
    available = [part.name[len("task=") :] for part in parts]
    for part, name in zip(parts, available):
        if wanted is not None and name not in wanted:
            continue
        try:
            check_task_name(name)
            bad_name = None
        except TaskNameError as exc:
            bad_name = str(exc)
        for f in sorted(part.rglob("*.parquet")):
            df = _read_parquet(f)
            # Columns this function adds itself: the file is quarantined, its values kept.
            reserved = [c for c in RESERVED_COLUMNS if c in df]
            df = df.rename(columns={c: f"input_{c}" for c in reserved})
            df.insert(0, "row_id", np.arange(next_id, next_id + len(df), dtype=np.int64))
            next_id += len(df)
            df["task"] = name
            df["source_file"] = str(f.relative_to(root))
            if bad_name:
                df["reason"] = "invalid_task_name"
            elif reserved:
                df["reason"] = "reserved_column"
            frames.append(df)
        if not bad_name:
            found.append(name)
    if wanted:
        missing = sorted(wanted - set(found))
        if missing:
            raise EvaluationError(f"task(s) {missing} not found under {root}; it has {available}")
    if not frames:
        raise EvaluationError(f"no parquet files under {root}")
    all_rows = pd.concat(frames, ignore_index=True)
    if "reason" not in all_rows:
        all_rows["reason"] = None
    all_rows["reason"] = all_rows["reason"].where(
        all_rows["reason"].notna(), _row_problems(all_rows)
    )
    bad = all_rows["reason"].notna()
    if bad.all():
        reasons = all_rows["reason"].value_counts().to_dict()
        raise EvaluationError(
            f"none of the {len(all_rows)} rows under {root} can be evaluated: {reasons} "
            "(each file needs query, ad_title and a 0/1 label column)"
        )
    rows = all_rows[~bad].drop(columns="reason").reset_index(drop=True)
    rows["label"] = pd.to_numeric(rows["label"]).astype(np.int64)
    if "grade" in rows:
        rows["grade"] = pd.to_numeric(rows["grade"], errors="coerce").astype(np.float64)
    return EvalData(rows, all_rows[bad].reset_index(drop=True), found, len(all_rows))


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise EvaluationError(f"cannot read {path}: {exc}") from exc
    df = table.to_pandas()
    for c in df.columns:  # dictionary-encoded strings arrive as categoricals
        if isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype(object)
    if "task" in df:  # the partition is the truth; a column of the same name is dropped
        df = df.drop(columns="task")
    return df


def _row_problems(df: pd.DataFrame) -> pd.Series:
    """Per row: the first reason it cannot be evaluated, else None."""
    reason = pd.Series([None] * len(df), index=df.index, dtype=object)

    def mark(mask, why):
        reason[mask & reason.isna()] = why

    if "label" not in df:
        mark(pd.Series(True, index=df.index), "missing_label_column")
        return reason
    for col in ("query", "ad_title"):
        if col not in df:
            mark(pd.Series(True, index=df.index), f"missing_{col}_column")
            continue
        mark(df[col].isna(), f"null_{col}")
        mark(df[col].astype(str).str.strip() == "", f"empty_{col}")
    label = pd.to_numeric(df["label"], errors="coerce")
    mark(df["label"].isna(), "null_label")
    mark(~label.isin([0, 1]), "label_not_binary")
    return reason


def _quarantined(rows: pd.DataFrame, why: str) -> pd.DataFrame:
    q = rows.copy()
    q["reason"] = why
    return q


def _select_tasks(cfg: EvalConfig, data: EvalData, model: Predictor) -> list[str]:
    if cfg.tasks:
        unknown = [t for t in cfg.tasks if t not in model.tasks]
        if unknown:
            raise EvaluationError(
                f"task(s) {unknown} are not in model {model.info.uri} (its tasks: {model.tasks})"
            )
        return list(cfg.tasks)
    tasks = [t for t in data.tasks if t in model.tasks and (data.rows["task"] == t).any()]
    if not tasks:
        raise EvaluationError(
            f"no task of model {model.info.uri} ({model.tasks}) has valid rows in the data "
            f"(tasks found: {data.tasks})"
        )
    return tasks


def _skipped(data: EvalData, tasks: list[str], model: Predictor) -> dict[str, str]:
    out = {}
    for t in data.tasks:
        if t in tasks:
            continue
        out[t] = "not a task of the model" if t not in model.tasks else "no valid rows"
    return out


# ---------------------------------------------------------------------------- scoring


def score_rows(
    rows: pd.DataFrame, predictors: dict[str, Predictor], progress: bool = True
) -> dict[str, np.ndarray]:
    """Probabilities (N,) per predictor, row-aligned with `rows` (NaN where it lacks the task)."""
    from tqdm.auto import tqdm

    n_units = sum(int(rows["task"].isin(p.tasks).sum()) for p in predictors.values())
    out = {name: np.full(len(rows), np.nan) for name in predictors}
    with tqdm(
        total=n_units,
        unit="rows",
        desc="scoring",
        disable=not progress,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,  # logs get a line every 10 s
    ) as bar:
        for name, pred in predictors.items():
            for task, idx in rows.groupby("task", sort=True).indices.items():
                if task not in pred.tasks:
                    continue
                bar.set_postfix_str(f"{name}:{task}")
                p = pred.predict(rows.iloc[idx], task, on_batch=bar.update)
                bad = ~np.isfinite(p)
                if bad.any():
                    first = int(rows["row_id"].iloc[idx[np.argmax(bad)]])
                    raise EvaluationError(
                        f"{name} model {pred.info.uri} returned {int(bad.sum())} non-finite "
                        f"scores for task {task!r} (first row_id {first})"
                    )
                out[name][idx] = p
    return out


def _thresholds(cfg: EvalConfig, predictors: dict[str, Predictor], tasks: list[str]) -> dict:
    """{model: {task: (threshold or None, source)}}; None: choose on the eval rows (flagged)."""
    dev = _dev_thresholds(cfg, predictors, tasks) if cfg.threshold_data else {}
    out = {}
    for name, pred in predictors.items():
        out[name] = {}
        for t in tasks:
            if t in cfg.thresholds:
                out[name][t] = (float(cfg.thresholds[t]), "given")
            elif t in pred.info.thresholds:
                out[name][t] = (pred.info.thresholds[t], "model metadata")
            elif np.isfinite(dev.get(name, {}).get(t, np.nan)):
                out[name][t] = (dev[name][t], "best F1 on dev")
            else:
                out[name][t] = (None, "best F1 on this data (optimistic)")
    return out


def _dev_thresholds(cfg: EvalConfig, predictors: dict[str, Predictor], tasks: list[str]) -> dict:
    dev = load_eval_data(cfg.threshold_data)
    rows = dev.rows[dev.rows["task"].isin(tasks)].reset_index(drop=True)
    scores = score_rows(rows, predictors, cfg.progress)
    out: dict = {}
    for name in predictors:
        out[name] = {}
        for t, idx in rows.groupby("task").indices.items():
            p = scores[name][idx]
            if np.isfinite(p).all():
                out[name][t] = best_f1_threshold(rows["label"].to_numpy()[idx], p)
    return out


# ---------------------------------------------------------------------------- measuring


def _measure(rows, scores, predictors, tasks, thresholds, cfg: EvalConfig) -> dict:
    """Per-task metrics, CIs, paired deltas, verdicts, macro averages and slices."""
    mcfg = cfg.metrics
    per_task: dict = {}
    verdicts: dict[str, TaskVerdict] = {}
    delta_samples: dict[str, list[np.ndarray]] = {m: [] for m in DELTA_METRICS}
    groups_all = query_groups(rows.get("query_id"), rows["query"])
    for task in tasks:
        idx = np.flatnonzero((rows["task"] == task).to_numpy())
        y = rows["label"].to_numpy()[idx]
        g = np.unique(groups_all[idx], return_inverse=True)[1]  # (n,) 0..Q-1
        grades = rows["grade"].to_numpy()[idx] if "grade" in rows else None
        models = {m: scores[m][idx] for m in predictors if np.isfinite(scores[m][idx]).all()}
        entry: dict = {}
        for m, p in models.items():
            thr, source = thresholds[m][task]
            entry[m] = point_metrics(y, p, g, grades, thr, mcfg)
            entry[m]["threshold_source"] = source
        if BASELINE in predictors and BASELINE not in models:
            entry[BASELINE] = None  # the champion has no model for this task
        boot = bootstrap(y, models, g, mcfg) if mcfg.n_boot > 0 else None
        for m in models:
            for metric in BOOTSTRAP_METRICS:
                lo, hi, why = boot.interval(m, metric) if boot else (math.nan, math.nan, "n_boot=0")
                entry[m][f"{metric}_ci"] = [lo, hi]
                if why and metric in ("roc_auc", "pr_auc"):
                    entry[m]["undefined"].setdefault(f"{metric}_ci", why)
        entry["delta"] = None
        if BASELINE in models:
            entry["delta"] = {}
            for metric in DELTA_METRICS:
                d = entry[MODEL][metric] - entry[BASELINE][metric]
                lo, hi, why = (
                    boot.delta(MODEL, BASELINE, metric)
                    if boot
                    else (math.nan, math.nan, "n_boot=0")
                )
                entry["delta"][metric] = {"delta": d, "ci": [lo, hi], "undefined": why}
                if boot:
                    delta_samples[metric].append(boot.delta_samples(MODEL, BASELINE, metric))
        verdict = judge(task, entry[MODEL], cfg.gates, entry.get(BASELINE), entry["delta"])
        entry["verdict"] = verdict.to_dict()
        verdicts[task] = verdict
        per_task[task] = entry
    macro = {
        m: macro_average({t: e[m] for t, e in per_task.items() if e.get(m)}, MACRO_KEYS)
        for m in predictors
    }
    compared = [t for t, e in per_task.items() if e["delta"] is not None]
    if compared:
        # Over the tasks both models have, so "champion → challenger" compares like with like.
        both = {
            m: macro_average({t: per_task[t][m] for t in compared}, DELTA_METRICS)
            for m in (MODEL, BASELINE)
        }
        macro["delta"] = {}
        for metric in DELTA_METRICS:
            ds = [per_task[t]["delta"][metric]["delta"] for t in compared]
            ds = [d for d in ds if math.isfinite(d)]
            samples = delta_samples[metric]
            lo, hi = macro_delta(samples, mcfg.ci) if samples else (math.nan, math.nan)
            macro["delta"][metric] = {
                "delta": float(np.mean(ds)) if ds else math.nan,
                "ci": [lo, hi],
                "tasks": len(ds),
                "model": both[MODEL][metric],
                "baseline": both[BASELINE][metric],
            }
    return {
        "tasks": per_task,
        "macro": macro,
        "verdicts": {t: v.verdict for t, v in verdicts.items()},
        "gate_failed": any(not v.passed for v in verdicts.values()),
        "slices": slice_metrics(
            rows, scores, tasks, cfg.slice_columns, cfg.min_slice_size, mcfg.n_bins
        ),
        "_verdicts": verdicts,
    }


def slice_values(rows: pd.DataFrame, column: str) -> pd.Series:
    """The slice label of every row for a derived slice or a data column."""
    if column == "query_length":
        words = rows["query"].astype(str).str.split().str.len()
        bins = [0, 1, 2, 4, 7, np.inf]
        labels = ["1 word", "2 words", "3-4 words", "5-7 words", "8+ words"]
        return pd.cut(words.clip(lower=1), bins, labels=labels).astype(str)
    if column == "has_description":
        if "ad_description" not in rows:
            return pd.Series("no description", index=rows.index)
        d = rows["ad_description"]
        present = d.notna() & (d.astype(str).str.strip() != "")
        return present.map({True: "with description", False: "no description"})
    col = rows[column]
    if pd.api.types.is_numeric_dtype(col) and col.nunique() > 12:
        return pd.qcut(col, 4, duplicates="drop").astype(str).where(col.notna(), "(missing)")
    vals = col.astype(object).where(col.notna(), "(missing)").astype(str)
    top = vals.value_counts().index[:MAX_SLICE_VALUES]
    return vals.where(vals.isin(top), "(other)")


def _check_slices(columns: list[str], rows: pd.DataFrame) -> None:
    unknown = [c for c in columns if c not in DERIVED_SLICES and c not in rows.columns]
    if unknown:
        raise EvaluationError(
            f"slice column(s) {unknown} are neither derived slices {list(DERIVED_SLICES)} nor "
            f"data columns ({sorted(rows.columns)})"
        )


def slice_metrics(rows, scores, tasks, columns, min_size: int, n_bins: int = 10) -> dict:
    """{task: {column: [one dict per slice value]}}; small slices listed without metrics."""
    out: dict = {}
    for column in columns:
        labels = slice_values(rows, column).to_numpy()
        for task in tasks:
            in_task = (rows["task"] == task).to_numpy()
            entries = []
            for value in sorted(set(labels[in_task])):
                idx = np.flatnonzero(in_task & (labels == value))
                y = rows["label"].to_numpy()[idx]
                e: dict = {
                    "value": value,
                    "rows": len(idx),
                    "positives": int(y.sum()),
                    "positive_rate": float(y.mean()),
                }
                if len(idx) < min_size:
                    e["note"] = f"fewer than {min_size} rows"
                else:
                    e["note"] = class_problem(y)
                    for m, s in scores.items():
                        p = s[idx]
                        if np.isfinite(p).all():
                            e[m] = {
                                "roc_auc": roc_auc(y, p),
                                "pr_auc": pr_auc(y, p),
                                "ece": ece(y, p, n_bins),
                            }
                    if MODEL in e and BASELINE in e:
                        e["delta_roc_auc"] = e[MODEL]["roc_auc"] - e[BASELINE]["roc_auc"]
                        e["delta_pr_auc"] = e[MODEL]["pr_auc"] - e[BASELINE]["pr_auc"]
                entries.append(e)
            out.setdefault(task, {})[column] = entries
    return out


# ---------------------------------------------------------------------------- outputs


def predictions_frame(rows: pd.DataFrame, scores: dict[str, np.ndarray]) -> pd.DataFrame:
    """row_id, task, query_id, label, grade, score (model) and baseline_score, row-aligned."""
    keep = [c for c in ("row_id", "task", "query_id", "ad_id", "label", "grade") if c in rows]
    df = rows[keep].copy()
    df["score"] = scores[MODEL].astype(np.float32)
    if BASELINE in scores:
        df["baseline_score"] = scores[BASELINE].astype(np.float32)
    return df


def _write_outputs(
    out: Path, rows, scores, quarantine: pd.DataFrame, data: dict
) -> dict[str, Path]:
    from pipeline.report import write_report

    paths = {
        "report": out / "report.html",
        "metrics": out / "metrics.json",
        "predictions": out / "predictions.parquet",
    }
    preds = predictions_frame(rows, scores)
    preds.to_parquet(paths["predictions"], index=False)
    q_path = out / "quarantine.parquet"
    if len(quarantine):
        _stringify(quarantine).to_parquet(q_path, index=False)
        paths["quarantine"] = q_path
    elif q_path.exists():
        q_path.unlink()  # a stale file from an earlier run would mislead
    data["paths"] = {k: str(v) for k, v in paths.items()}
    clean = _jsonable({k: v for k, v in data.items() if k != "_verdicts"})
    paths["metrics"].write_text(json.dumps(clean, indent=2, allow_nan=False))
    write_report(paths["report"], clean, preds)
    return paths


def _stringify(df: pd.DataFrame) -> pd.DataFrame:
    """Quarantined rows keep every column, as text (bad rows have bad types)."""
    out = df.copy()
    for c in out.columns:
        if c != "row_id":
            out[c] = out[c].map(
                lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            )
    return out


def _jsonable(x):
    """NaN/inf -> None, numpy -> Python, recursively (metrics.json is strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


# ---------------------------------------------------------------------------- MLflow


def log_to_mlflow(result: EvalResult, model: Predictor, cfg: EvalConfig, baseline) -> str | None:
    """Log metrics and the output files; returns the run id (None when there is no store)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        log.warning("MLflow logging skipped: no tracking URI (set MLFLOW_TRACKING_URI)")
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=uri)
    run_id, created = _target_run(client, cfg, model)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in mlflow_metrics(result.metrics).items()]
    tags = [
        RunTag("adrel.eval.verdict", "fail" if result.gate_failed else "pass"),
        RunTag("adrel.eval.failed_tasks", ",".join(result.failed_tasks) or "-"),
        RunTag("adrel.eval.model", model.info.uri),
        RunTag("adrel.eval.baseline", str(baseline) if baseline is not None else "-"),
    ]
    params = []
    if created:
        params = [Param("model", model.info.uri), Param("baseline", str(baseline or "-"))]
        params.append(Param("data_dir", result.metrics["data"]["dir"][:500]))
    for i in range(0, len(metrics), 500):  # log_batch takes at most 1000 metrics
        client.log_batch(
            run_id,
            metrics=metrics[i : i + 500],
            params=params if i == 0 else [],
            tags=tags if i == 0 else [],
        )
    if not metrics:
        client.log_batch(run_id, params=params, tags=tags)
    for path in result.paths.values():
        client.log_artifact(run_id, str(path), cfg.artifact_path)
    if created:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _target_run(client, cfg: EvalConfig, model: Predictor) -> tuple[str, bool]:
    for run_id in (cfg.mlflow_run_id, model.info.mlflow_run_id):
        if not run_id:
            continue
        try:
            client.get_run(run_id)
            return run_id, False
        except Exception:
            if run_id == cfg.mlflow_run_id:
                raise EvaluationError(
                    f"MLflow run {run_id} not found in {client.tracking_uri}"
                ) from None
            log.warning(
                "the model's run %s is not in this tracking store; logging to a new run", run_id
            )
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(
            cfg.experiment, artifact_location=artifact_location(client.tracking_uri)
        )
    )
    run = client.create_run(exp_id, run_name=f"evaluate {Path(str(model.info.uri)).name}")
    return run.info.run_id, True


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """Flat `eval.<task>.<metric>` names (MLflow allows no '@': ndcg@5 -> ndcg_at_5)."""
    out: dict[str, float] = {}
    keys = (*MACRO_KEYS, "positive_rate")

    def put(name, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name.replace("@", "_at_")] = float(value)

    for task, e in metrics["tasks"].items():
        for k in (*keys, "rows", "queries"):
            put(f"eval.{task}.{k}", (e.get(MODEL) or {}).get(k))
            if e.get(BASELINE):
                put(f"eval.{task}.baseline_{k}", e[BASELINE].get(k))
        for k, d in (e.get("delta") or {}).items():
            put(f"eval.{task}.delta_{k}", d.get("delta"))
        put(f"eval.{task}.gate_pass", 1.0 if e["verdict"]["passed"] else 0.0)
    for k in MACRO_KEYS:
        put(f"eval.macro.{k}", metrics["macro"].get(MODEL, {}).get(k))
    for k, d in (metrics["macro"].get("delta") or {}).items():
        put(f"eval.macro.delta_{k}", d.get("delta"))
    put("eval.gate_failed", 1.0 if metrics["gate_failed"] else 0.0)
    return out
