"""The scheduled retraining job: validate → train → evaluate → export → register → promote → score.

Each stage records its completion, outputs and a content hash of its inputs in
`<workdir>/retrain/<run>/state.json`; re-running the same run name after a crash resumes after
the last completed stage (training itself resumes from its Ray Train checkpoint), nothing is
registered twice, and a finished run re-run only prints its summary. All stages log into one
MLflow parent run (stage tags + a JSON artifact per stage; the training and evaluation runs are
nested under it). A lock per registry prefix keeps two retrains from racing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.lock import RunLock
from pipeline.retrain_config import TRAIN_RUN_SUFFIX, RetrainConfig
from pipeline.stages import StageLog, hash_path, hash_value

EXIT_OK = 0  # every task promoted (or already champion)
EXIT_FAILED = 1  # a stage failed: nothing promoted by this run
EXIT_HELD = 3  # at least one task failed its gates: its champion was kept
EXIT_LOCKED = 75  # another retrain with the same registry prefix is running (EX_TEMPFAIL)

STAGES = ("ingest", "train", "evaluate", "export", "register", "promote", "score")
SPLITS = ("train", "dev", "holdout")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"stage {stage!r} failed: {message}")


@dataclass
class RetrainResult:
    run_name: str
    exit_code: int
    summary: str
    decisions: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)
    parent_run_id: str | None = None
    resumed_stages: list[str] = field(default_factory=list)


def default_run_name() -> str:
    return time.strftime("retrain-%Y%m%d-%H%M%S")


class Retrain:
    """One retrain run. `run()` needs Ray running (the job starts or joins it)."""

    def __init__(self, cfg: RetrainConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_name = cfg.run_name or default_run_name()
        self.workdir = Path(cfg.workdir).resolve()
        self.run_dir = self.workdir / "retrain" / self.run_name
        self.state = StageLog(self.run_dir / "state.json")
        self.log = log
        from jobs.runtime import tracking_uri

        self.tracking_uri = tracking_uri(self.workdir, cfg.registry.tracking_uri)
        self.prefix = cfg.registry.prefix

    def preflight(self) -> None:
        """ConfigError listing every input folder the stages still to run need and lack."""
        from models.config import ConfigError

        errors = []
        if not self.state.done("ingest"):
            for split in SPLITS:
                root = getattr(self.cfg.data, f"{split}_root")
                if not Path(root).is_dir():
                    errors.append(f"data.{split}_root: no data directory at {root}")
        inv = self.cfg.inventory.input
        if inv is not None and not self.state.done("score") and not Path(inv).is_dir():
            errors.append(f"inventory.input: no inventory directory at {inv}")
        if errors:
            raise ConfigError(errors)

    # ------------------------------------------------------------------ orchestration

    def run(self) -> RetrainResult:
        if self.state.get("finished"):
            fin = self.state.get("finished")
            self.log(f"run {self.run_name} already finished; nothing to do.\n{fin['summary']}")
            return RetrainResult(self.run_name, fin["exit_code"], fin["summary"], fin["decisions"],
                                 self._outputs(), self.state.get("parent_run_id"), list(STAGES))  # fmt: skip
        lock = RunLock(self.cfg.lock_path(), self.cfg.lock.stale_after_s, owner=self.run_name)
        with lock, _env("MLFLOW_TRACKING_URI", self.tracking_uri):
            self._start_parent()
            resumed = [s for s in STAGES if self.state.done(s)]
            if resumed:
                self.log(f"resuming run {self.run_name}: stages done {resumed}")
            try:
                ingest = self._stage("ingest", self._ingest, self._window_hash())
                train = self._stage("train", lambda: self._train(ingest), hash_value(ingest))
                ev = self._stage(
                    "evaluate", lambda: self._evaluate(ingest, train), hash_value(train)
                )
                exp = self._stage("export", lambda: self._export(ingest, train), hash_value(train))
                reg = self._stage("register", lambda: self._register(train, exp), hash_value(exp))
                prom = self._stage("promote", lambda: self._promote(ev, reg), hash_value([ev, reg]))
                self._stage("score", self._score, hash_value(prom))
            except BaseException:
                self._end_parent("FAILED")
                raise
            decisions = prom["decisions"]
            code = EXIT_OK if all(d["promoted"] for d in decisions.values()) else EXIT_HELD
            summary = self._summary(ingest, train, ev, reg, decisions)
            self.state.set(
                "finished", {"exit_code": code, "summary": summary, "decisions": decisions}
            )
            self._client().log_text(self.parent_id, summary, "summary.txt")
            self._end_parent("FINISHED")
            self.log(summary)
            return RetrainResult(self.run_name, code, summary, decisions, self._outputs(),
                                 self.parent_id, resumed)  # fmt: skip

    def _stage(self, name: str, fn: Callable[[], dict], inputs_hash: str) -> dict:
        if self.state.done(name, inputs_hash):
            return self.state.outputs(name)
        self.log(f"[{self.run_name}] stage {name} …")
        t0 = time.time()
        try:
            out = fn()
        except StageFailed:
            raise
        except Exception as e:
            raise StageFailed(name, f"{type(e).__name__}: {e}") from e
        out = {**out, "seconds": round(time.time() - t0, 1)}
        self.state.record(name, out, inputs_hash)
        client = self._client()
        client.set_tag(self.parent_id, f"adrel.stage.{name}", "done")
        client.log_metric(self.parent_id, f"stage_seconds/{name}", out["seconds"])
        client.log_text(
            self.parent_id, json.dumps(out, indent=2, default=str), f"stages/{name}.json"
        )
        return out

    def _outputs(self) -> dict:
        return {s: self.state.outputs(s) for s in STAGES if self.state.done(s)}

    # ------------------------------------------------------------------ MLflow parent run

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    def _start_parent(self) -> None:
        client = self._client()
        pid = self.state.get("parent_run_id")
        if pid is None:
            from pipeline.tracking import artifact_location

            name = self.cfg.registry.experiment
            exp = client.get_experiment_by_name(name)
            exp_id = (
                exp.experiment_id
                if exp
                else client.create_experiment(
                    name, artifact_location=artifact_location(self.tracking_uri, self.workdir)
                )
            )
            run = client.create_run(exp_id, run_name=self.run_name, tags={"adrel.job": "retrain",
                                                                         "adrel.prefix": self.prefix})  # fmt: skip
            pid = run.info.run_id
            client.log_text(
                pid, json.dumps(self.cfg.model_dump(mode="json"), indent=2), "retrain_config.json"
            )
            self.state.set("parent_run_id", pid)
        else:
            client.update_run(pid, status="RUNNING")
        self.parent_id = pid

    def _end_parent(self, status: str) -> None:
        self._client().set_terminated(self.parent_id, status=status)

    def _nest(self, run_id: str | None) -> None:
        if run_id:
            self._client().set_tag(run_id, "mlflow.parentRunId", self.parent_id)

    # ------------------------------------------------------------------ stages

    def _window_hash(self) -> str:
        d = self.cfg.data
        return hash_value(
            {s: hash_path(getattr(d, f"{s}_root")) for s in SPLITS}
            | {"v": d.validation, "t": d.tasks}
        )

    def _ingest(self) -> dict:
        from features.validate import ThresholdExceeded, ValidationConfig, validate_dir

        vcfg = ValidationConfig(**{**self.cfg.data.validation, "require_label": True})
        out = {}
        for split in SPLITS:
            root = getattr(self.cfg.data, f"{split}_root")
            report = validate_dir(root, self.run_dir / "data" / split, vcfg, overwrite=True)
            self.log(f"{split}: {report.table()}")
            try:
                report.check()
            except ThresholdExceeded as e:
                raise StageFailed("ingest", f"{split} data refused: {e}") from None
            out[split] = {
                "clean": str(self.run_dir / "data" / split / "clean"),
                "rows_in": report.rows_in,
                "rows_clean": report.rows_clean,
                "rows_quarantined": report.rows_quarantined,
                "quarantine": report.quarantine_dir,
            }
        return out

    def _train(self, ingest: dict) -> dict:
        from pipeline.ray_train import run_training

        tcfg = self.cfg.train_config(
            f"{self.run_name}{TRAIN_RUN_SUFFIX}", ingest["train"]["clean"], ingest["dev"]["clean"]
        )
        res = run_training(tcfg, config_text=json.dumps(tcfg.to_dict(), indent=2), config_name="train.json",
                           log=self.log)  # fmt: skip
        self._nest(res.mlflow_run_id)
        ckpt = res.local_checkpoint_dir or res.checkpoint_path
        return {
            "checkpoint": ckpt,
            "mlflow_run_id": res.mlflow_run_id,
            "steps": res.step,
            "best_step": res.best_step,
            "dev_macro_auc": res.best_macro_auc,
            "dev_auc": {
                k.removeprefix("best/auc/"): v
                for k, v in res.metrics.items()
                if k.startswith("best/auc/")
            },
        }

    def _champion_uri(self) -> str | None:
        """`models:/<prefix>@champion` when any task has a champion, else None (first run)."""
        from mlflow.exceptions import MlflowException

        from pipeline.registry import CHAMPION

        client = self._client()
        try:
            models = client.search_registered_models(f"name LIKE '{self.prefix}-%'")
        except MlflowException:
            return None
        for m in models:
            if m.name != f"{self.prefix}-mtl" and CHAMPION in (m.aliases or {}):
                return f"models:/{self.prefix}@{CHAMPION}"
        return None

    def _evaluate(self, ingest: dict, train: dict) -> dict:
        from pipeline.evaluate import EvalConfig, evaluate
        from pipeline.metrics import MetricConfig

        baseline = self._champion_uri()
        ev = self.cfg.evaluation
        cfg = EvalConfig(
            gates=ev.gate_config(),
            metrics=MetricConfig(n_boot=ev.n_boot),
            slice_columns=ev.slice_columns,
            min_slice_size=ev.min_slice_size,
            threshold_data=ingest["dev"]["clean"],
            tracking_uri=self.tracking_uri,
            mlflow_run_id=train["mlflow_run_id"],
            progress=False,
        )
        res = evaluate(train["checkpoint"], ingest["holdout"]["clean"], self.run_dir / "evaluation",
                       baseline=baseline, config=cfg)  # fmt: skip
        verdicts = {
            t: {"passed": v.passed, "reasons": list(v.reasons), "first_model": baseline is None}
            for t, v in res.verdicts.items()
        }
        per_task = res.metrics.get("tasks", {})
        return {
            "report": str(res.paths["report"]),
            "metrics_json": str(res.paths.get("metrics", "")),
            "baseline": baseline,
            "verdicts": verdicts,
            "holdout_auc": {t: _get(m, "model", "roc_auc") for t, m in per_task.items()},
            "champion_auc": {t: _get(m, "baseline", "roc_auc") for t, m in per_task.items()},
        }

    def _export(self, ingest: dict, train: dict) -> dict:
        from pipeline.export import ExportConfig, export_checkpoint

        ex = self.cfg.export
        cfg = ExportConfig(
            quantize=ex.quantize,
            max_auc_drop=ex.max_auc_drop,
            validation=ingest["holdout"]["clean"] if ex.quantize else None,
            source=train["checkpoint"],
            source_info={"run_id": train["mlflow_run_id"]},
        )
        out = self.run_dir / "export"
        res = export_checkpoint(train["checkpoint"], out, cfg)
        self.log(res.summary())
        parity = {
            t: max(v["max_abs_diff"] for v in te.parity["variants"].values())
            for t, te in res.tasks.items()
        }
        return {"dir": str(out), "tasks": list(res.tasks), "parity_max_abs_diff": parity}

    def _register(self, train: dict, exp: dict) -> dict:
        from pipeline.registry import register_checkpoint, register_export

        mtl = register_checkpoint(train["checkpoint"], run_id=train["mlflow_run_id"], prefix=self.prefix,
                                  tracking_uri=self.tracking_uri, tags={"adrel.retrain_run": self.run_name})  # fmt: skip
        # Tasks registered by an earlier, interrupted attempt of this run are not registered again.
        done = self._registered_tasks(train["mlflow_run_id"], exp["tasks"])
        todo = [t for t in exp["tasks"] if t not in done]
        if todo:
            new = register_export(exp["dir"], prefix=self.prefix, tracking_uri=self.tracking_uri,
                                  source_run_id=train["mlflow_run_id"], tasks=todo)  # fmt: skip
            done.update({t: rv.version for t, rv in new.items()})
        return {"mtl_version": mtl.version, "task_versions": done}

    def _registered_tasks(self, source_run: str | None, tasks: list[str]) -> dict[str, str]:
        from pipeline.registry import task_model_name

        if not source_run:
            return {}
        client, found = self._client(), {}
        for t in tasks:
            name = task_model_name(t, self.prefix)
            try:
                versions = client.search_model_versions(f"name = '{name}'")
            except Exception:
                continue
            for mv in versions:
                if (mv.tags or {}).get("adrel.source_run") == source_run:
                    found[t] = str(mv.version)
        return found

    def _promote(self, ev: dict, reg: dict) -> dict:
        from pipeline.registry import promote

        decisions = {}
        for task, version in sorted(reg["task_versions"].items()):
            v = ev["verdicts"].get(task, {"passed": False, "reasons": ["not evaluated"]})
            if v["passed"] and self.cfg.registry.promote:
                why = (
                    "first model: absolute bars passed"
                    if ev["baseline"] is None
                    else "gates passed vs champion"
                )
                promote(task, version, reason=f"retrain {self.run_name}: {why}", actor=f"adrel retrain {self.run_name}",
                        prefix=self.prefix, tracking_uri=self.tracking_uri)  # fmt: skip
                decisions[task] = {"version": version, "promoted": True, "why": why}
            else:
                why = "; ".join(v["reasons"]) or "promotion disabled"
                decisions[task] = {"version": version, "promoted": False, "why": why}
        if decisions and all(d["promoted"] for d in decisions.values()):
            promote("mtl", reg["mtl_version"], reason=f"retrain {self.run_name}: every task promoted",
                    actor=f"adrel retrain {self.run_name}", prefix=self.prefix, tracking_uri=self.tracking_uri)  # fmt: skip
        client = self._client()
        for task, d in decisions.items():
            client.set_tag(
                self.parent_id, f"adrel.decision.{task}", "promoted" if d["promoted"] else "held"
            )
        return {"decisions": decisions}

    def _score(self) -> dict:
        inv = self.cfg.inventory
        if not inv.input:
            return {"skipped": "no inventory configured"}
        from pipeline.batch_score import score_inventory

        out = Path(inv.output or self.workdir / "scored") / self.run_name
        res = score_inventory(f"models:/{self.prefix}@champion", inv.input, out, overwrite=True,
                              batch_size=inv.batch_size, num_actors=inv.actors, log=self.log)  # fmt: skip
        return {"output": str(out), "rows_in": res.rows_in, "rows_scored": res.rows_scored,
                "rows_quarantined": res.rows_quarantined, "rows_per_s": round(res.rows_per_s, 1)}  # fmt: skip

    # ------------------------------------------------------------------ summary

    def _summary(self, ingest, train, ev, reg, decisions) -> str:
        lines = [
            f"retrain {self.run_name}: {train['steps']} steps, dev macro AUC {train['dev_macro_auc']:.4f}",
            f"{'task':<18}{'version':>8}{'holdout AUC':>13}{'champion':>10}  decision",
        ]
        for task, d in sorted(decisions.items()):
            auc, champ = ev["holdout_auc"].get(task), ev["champion_auc"].get(task)
            lines.append(
                f"{task:<18}{d['version']:>8}{_fmt(auc):>13}{_fmt(champ):>10}  "
                f"{'PROMOTED' if d['promoted'] else 'HELD'} ({d['why']})"
            )
        lines += [
            f"report: {ev['report']}",
            f"registered: {self.prefix}-mtl v{reg['mtl_version']}, "
            + ", ".join(f"{self.prefix}-{t} v{v}" for t, v in sorted(reg["task_versions"].items())),
            f"mlflow: {self.tracking_uri} (parent run {self.parent_id})",
        ]
        return "\n".join(lines)


@contextmanager
def _env(key: str, value: str):
    """Set an environment variable for the duration of the run (model URIs resolve through it)."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _get(m: dict, who: str, metric: str):
    try:
        v = m[who][metric]
        return v.get("value") if isinstance(v, dict) else v
    except (KeyError, TypeError):
        return None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
