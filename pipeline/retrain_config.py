"""Typed configuration of the scheduled retraining job (`adrel retrain`).

A YAML preset maps 1:1 onto `RetrainConfig`. The `train` section is a training config
(pipeline.config.TrainConfig) without its data roots, workdir and run name: the job fills those
in from the validated data window and the retrain run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from models.config import ConfigError
from pipeline.config import (
    TrainConfig,
    _Section,
    check_run_name,
    check_tasks,
    read_yaml,
    validate_config,
)
from pipeline.config_errors import format_validation_error

TRAIN_RUN_SUFFIX = "-train"  # the retrain run's training run: <run_name>-train


class WindowSection(_Section):
    """The data window: raw contract-layout roots (`<root>/task=<name>/*.parquet`).

    tasks: names to train on, or "all" (every partition in train_root).
    validation: features.validate.ValidationConfig settings (max_bad_fraction etc.).
    """

    train_root: str
    dev_root: str
    holdout_root: str
    tasks: list[str] | Literal["all"] = "all"
    max_length: int = Field(128, ge=8, le=4096)
    validation: dict[str, Any] = Field(default_factory=dict)

    _check_tasks = field_validator("tasks")(check_tasks)

    @field_validator("validation")
    @classmethod
    def _check_validation(cls, v):
        from features.validate import ValidationConfig

        try:
            ValidationConfig(**v)
        except TypeError:
            raise ValueError(
                f"unknown validation setting(s); known: {sorted(ValidationConfig.__dataclass_fields__)}"
            ) from None
        except ConfigError as e:
            raise ValueError("; ".join(e.errors)) from None
        return v


class EvaluationSection(_Section):
    """Holdout evaluation of challenger vs champion; gates: pipeline.gates.GateConfig fields."""

    gates: dict[str, Any] = Field(default_factory=dict)
    slice_columns: list[str] = Field(default_factory=lambda: ["query_length", "has_description"])
    min_slice_size: int = Field(50, ge=1)
    n_boot: int = Field(300, ge=0)  # bootstrap resamples over queries for CIs and deltas

    @field_validator("gates")
    @classmethod
    def _check_gates(cls, v):
        from pipeline.gates import GateConfig

        try:
            GateConfig(**v)
        except TypeError:
            raise ValueError(
                f"unknown gate(s); known: {sorted(GateConfig.__dataclass_fields__)}"
            ) from None
        except ValueError as e:
            raise ValueError(str(e)) from None
        return v

    def gate_config(self):
        from pipeline.gates import GateConfig

        return GateConfig(**self.gates)


class ExportSection(_Section):
    """Merged per-task ONNX export (parity-gated); int8 is checked on the holdout rows."""

    quantize: Literal["int8"] | None = None
    max_auc_drop: float = Field(0.005, ge=0.0, lt=1.0)


class RegistrySection(_Section):
    """Model registry: names `<prefix>-mtl` and `<prefix>-<task>`; MLflow tracking URI."""

    prefix: str = "adrel"
    tracking_uri: str | None = None
    experiment: str = "adrel-retrain"
    promote: bool = True

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, v):
        from pipeline.registry import check_prefix

        return check_prefix(v)


class InventorySection(_Section):
    """Optional batch scoring of an inventory with the new champions after promotion."""

    input: str | None = None
    output: str | None = None
    batch_size: int = Field(256, ge=1)
    actors: int = Field(1, ge=1)


class LockSection(_Section):
    """One retrain per registry prefix at a time; a lock older than stale_after_s is taken over."""

    path: str | None = None
    stale_after_s: float = Field(6 * 3600, gt=0)


class RetrainConfig(_Section):
    workdir: str = "adrel-work"
    run_name: str | None = None
    data: WindowSection
    train: dict[str, Any] = Field(default_factory=dict)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    export: ExportSection = Field(default_factory=ExportSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    inventory: InventorySection = Field(default_factory=InventorySection)
    lock: LockSection = Field(default_factory=LockSection)

    _check_run_name = field_validator("run_name", mode="before")(check_run_name)

    @field_validator("run_name")
    @classmethod
    def _fits_train_run_name(cls, v):
        if v is not None and len(v) > 128 - len(TRAIN_RUN_SUFFIX):
            raise ValueError(
                f"at most {128 - len(TRAIN_RUN_SUFFIX)} characters: its training run is named "
                f"<run_name>{TRAIN_RUN_SUFFIX}"
            )
        return v

    @field_validator("train")
    @classmethod
    def _check_train(cls, v):
        # Validate the training section now, with placeholder roots: errors surface up front,
        # together with the other sections' errors.
        forbidden = sorted({"workdir", "run_name", "data"} & set(v))
        if forbidden:
            raise ValueError(
                f"{forbidden} are set by the retrain job (use the top-level data/workdir)"
            )
        d = {**v, "data": {"train_root": "train", "dev_root": "dev"}}
        try:
            TrainConfig.model_validate(d)
        except ValidationError as e:
            raise ValueError("\n".join(format_validation_error(e))) from None
        return v

    def train_config(self, run_name: str, train_root: str, dev_root: str) -> TrainConfig:
        d = {
            **self.train,
            "workdir": self.workdir,
            "run_name": run_name,
            "data": {
                "train_root": train_root,
                "dev_root": dev_root,
                "tasks": self.data.tasks,
                "max_length": self.data.max_length,
                "validation": self.data.validation,
            },
        }
        if self.registry.tracking_uri:
            d.setdefault("tracking", {})
            d["tracking"] = {**d["tracking"], "uri": self.registry.tracking_uri}
        try:
            return TrainConfig.model_validate(d)
        except ValidationError as e:
            raise ValueError(
                "\n".join("train." + line for line in format_validation_error(e))
            ) from None

    def lock_path(self) -> Path:
        if self.lock.path:
            return Path(self.lock.path)
        return Path(self.workdir) / "locks" / f"retrain-{self.registry.prefix}.lock"


def load_retrain_config(
    path: str | Path, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> RetrainConfig:
    """Read a retrain YAML and apply dotted overrides (and `values`, top-level fields as they
    are); ConfigError lists every problem."""
    return validate_config(RetrainConfig, read_yaml(path), overrides, values)
