"""Typed, validated configuration of a training run, grouped by concern.

A YAML file maps 1:1 onto `TrainConfig`; `load_config(path, overrides)` applies dotted
`a.b=value` overrides (values parsed as YAML) and reports every bad field and value at once.
"""

from __future__ import annotations

import re
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.config import AdapterConfig, ConfigError
from models.encoder import DEFAULT_ENCODER
from pipeline.config_errors import format_validation_error

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ALL_TASKS = "all"
SYNTH_MAX_ROWS_PER_TASK = 1_000_000  # features.synth.MAX_ROWS_PER_TASK (a test keeps them equal)


def check_run_name(v: Any) -> str | None:
    """A run name is also a folder and an MLflow run name: 1-128 safe characters."""
    if v is not None and not isinstance(v, str):
        # YAML (a config file, --set) reads 2026-11-29 as a date and 0123 as a number.
        raise ValueError("a run name is text: quote it in YAML or --set (run_name='2026-11-29')")
    if v is not None and not RUN_NAME_RE.match(v):
        raise ValueError(
            "use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return v


def check_tasks(v: Any) -> Any:
    """A list of valid, distinct task names (every bad one named at once), or "all"."""
    if isinstance(v, list):
        from features.tasks import check_task_name

        if not v:
            raise ValueError('list at least one task, or use "all"')
        bad = []
        for name in v:
            try:
                check_task_name(name)
            except ValueError:
                bad.append(name)
        if bad:
            raise ValueError(
                f"invalid task name(s) {bad}: use 1-64 letters, digits, '_' or '-', starting "
                "with a letter or digit (no path separators, no '..')"
            )
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate task names in {v}")
    return v


class _Section(BaseModel):
    # nan and inf pass every `>= 0` bound; no setting here means them (YAML: .nan, .inf).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SyntheticSection(_Section):
    """Generate synthetic train/dev data (features.synth) into the data roots when they hold
    no task partitions yet: demos and CI need no data of their own."""

    rows_per_task: int = Field(400, ge=4, le=SYNTH_MAX_ROWS_PER_TASK)
    dev_rows_per_task: int = Field(100, ge=4, le=SYNTH_MAX_ROWS_PER_TASK)
    seed: int = Field(0, ge=0)


class DataSection(_Section):
    """Where the train/dev data live (`<root>/task=<name>/*.parquet`) and how it is read.

    tasks: task names to train on, or "all" for every `task=<name>` partition under train_root.
    validation: settings of features.validate.ValidationConfig (row checks at ingest).
    quarantine_dir: where rejected rows go (default `<workdir>/quarantine/<run_name>`).
    synthetic: when set, synthetic data is generated into empty roots first.
    """

    train_root: str
    dev_root: str
    tasks: list[str] | Literal["all"] = ALL_TASKS
    max_length: int = Field(128, ge=8, le=4096)
    validation: dict[str, Any] = Field(default_factory=dict)
    quarantine_dir: str | None = None
    synthetic: SyntheticSection | None = None

    _check_tasks = field_validator("tasks")(check_tasks)

    @field_validator("validation")
    @classmethod
    def _check_validation(cls, v):
        try:
            from features.validate import ValidationConfig
        except ImportError:  # the data package is optional at config time
            return v
        try:
            ValidationConfig(**v)
        except TypeError:
            known = sorted(ValidationConfig.__dataclass_fields__)
            raise ValueError(f"unknown validation setting(s); known: {known}") from None
        except ConfigError as e:
            raise ValueError("; ".join(e.errors)) from None
        return v

    def validation_config(self):
        """The features.validate.ValidationConfig of these settings."""
        from features.validate import ValidationConfig

        return ValidationConfig(**self.validation)


_ADAPTER_DEFAULTS = AdapterConfig()


class AdapterSection(_Section):
    """AdapterConfig fields except num_tasks (the number of tasks found in the data); the
    defaults are AdapterConfig's own, so the two cannot drift apart."""

    variant: str = _ADAPTER_DEFAULTS.variant
    r: int = _ADAPTER_DEFAULTS.r
    n_up: int = _ADAPTER_DEFAULTS.n_up
    tau: float = _ADAPTER_DEFAULTS.tau
    alpha: float = _ADAPTER_DEFAULTS.alpha
    dropout: float = _ADAPTER_DEFAULTS.dropout
    lambda_type: str = _ADAPTER_DEFAULTS.lambda_type
    mix_init: str = _ADAPTER_DEFAULTS.mix_init
    mix_init_std: float = _ADAPTER_DEFAULTS.mix_init_std
    targets: list[str] | None = None

    @model_validator(mode="after")
    def _check(self):
        # The foundation's AdapterConfig owns the rules: reuse them (all errors at once).
        from models.adapters import ADAPTERS

        errors = []
        try:
            self.to_adapter_config(num_tasks=1)
        except ConfigError as e:
            errors += e.errors
        if self.variant not in ADAPTERS:
            errors.append(f"variant must be one of {sorted(ADAPTERS)}, got {self.variant!r}")
        if errors:
            raise ValueError("\n".join(errors))  # one line per error in the report
        return self

    def to_adapter_config(self, num_tasks: int) -> AdapterConfig:
        d = self.model_dump(exclude_none=True)
        known = {f.name for f in dc_fields(AdapterConfig)}
        return AdapterConfig(**{k: v for k, v in d.items() if k in known}, num_tasks=num_tasks)


class ModelSection(_Section):
    """The base encoder (a spec for models.encoder.resolve_encoder), adapters, pooling, heads."""

    base_model: str = DEFAULT_ENCODER
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    pooling: Literal["cls", "mean"] = "mean"
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0)


class OptimSection(_Section):
    """AdamW over trainable parameters; warmup then linear/cosine decay.

    batch_size is per worker and micro-step: one optimizer step sees
    batch_size * grad_accum * num_workers examples. max_steps, when set, wins over epochs.
    weight_decay never applies to Λ_t (lora_lambda), w_t (lora_w), gates, biases or norms.
    """

    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0)
    schedule: Literal["linear", "cosine"] = "linear"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    grad_accum: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(1.0, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("betas must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set optim.max_steps or optim.epochs")
        return self


class SamplingSection(_Section):
    """Task mixing: p_t ∝ n_t (proportional) or p_t ∝ n_t^(1/T) (temperature)."""

    strategy: Literal["proportional", "temperature"] = "temperature"
    temperature: float = Field(2.0, gt=0.0)


class EvalSection(_Section):
    """Dev evaluation every N steps (and at the end); early stopping when patience is set."""

    every_steps: int = Field(200, ge=1)
    batch_size: int = Field(256, ge=1)
    patience: int | None = Field(None, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class CheckpointSection(_Section):
    """Ray Train checkpoints every N steps to storage_path (a local dir or a pyarrow URI).

    storage_path defaults to `<workdir>/ray_results`; keep is how many checkpoints Ray keeps
    (a successful run also removes what a failed attempt uploaded but never registered);
    max_failures is how often a failed worker group is restarted from the last checkpoint.
    """

    every_steps: int = Field(200, ge=1)
    storage_path: str | None = None
    keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1)


class ScalingSection(_Section):
    """Ray Train workers. address: a Ray cluster address (else RAY_ADDRESS, else local)."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    torch_threads: int | None = Field(None, ge=1)
    address: str | None = None

    @field_validator("resources_per_worker")
    @classmethod
    def _check_resources(cls, v):
        if v is not None:
            bad = {k: x for k, x in v.items() if x < 0}
            if bad:
                raise ValueError(f"resources must be >= 0, got {bad}")
        return v


class TrackingSection(_Section):
    """MLflow: uri (else MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = Field("adrel-train", min_length=1)
    log_every_steps: int = Field(10, ge=1)


class TrainConfig(_Section):
    """Everything a training run needs, validated up front."""

    data: DataSection
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    seed: int = Field(0, ge=0)
    workdir: str = "adrel-work"
    run_name: str | None = None

    _check_run_name = field_validator("run_name", mode="before")(check_run_name)

    def storage_path(self) -> str:
        """Ray Train storage: the configured path/URI, else an absolute `<workdir>/ray_results`."""
        sp = self.checkpoint.storage_path
        if sp is None:
            return str((Path(self.workdir) / "ray_results").resolve())
        if "://" in sp:
            return sp
        return str(Path(sp).expanduser().resolve())

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def parse_overrides(overrides: list[str] | None) -> tuple[list[tuple[list[str], Any]], list[str]]:
    """`a.b=value` strings -> ([(["a", "b"], value)], errors); values are parsed as YAML."""
    parsed, errors = [], []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            errors.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            errors.append(f"override {item!r}: value is not valid YAML ({e.problem})")
            continue
        parsed.append((key.split("."), value))
    return parsed, errors


def apply_overrides(d: dict, overrides: list[tuple[list[str], Any]]) -> list[str]:
    """Set each dotted key in the nested dict `d`, in place; returns errors."""
    errors = []
    for path, value in overrides:
        node = d
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                errors.append(
                    f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is {nxt!r}, not a section"
                )
                break
            node = nxt
        else:
            node[path[-1]] = value
    return errors


def validate_config(
    model: type[BaseModel],
    d: dict | None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
):
    """`model` validated from dict `d` plus dotted overrides, then `values` (top-level fields
    given as they are, not parsed as YAML: a command-line option such as --run-name);
    ConfigError lists every problem."""
    d = dict(d or {})
    parsed, errors = parse_overrides(overrides)
    errors += apply_overrides(d, parsed)
    d.update({k: v for k, v in (values or {}).items() if v is not None})
    try:
        cfg = model.model_validate(d)
    except ValidationError as e:
        raise ConfigError(errors + format_validation_error(e)) from None
    if errors:
        raise ConfigError(errors)
    return cfg


def read_yaml(path: str | Path) -> dict:
    """A YAML config file's mapping; ConfigError when it is missing, malformed or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"])
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {str(p)!r} is not valid YAML: {e}"]) from None
    if d is None:  # an empty file
        return {}
    if not isinstance(d, dict):
        raise ConfigError([f"config file {str(p)!r} must hold a mapping, got {type(d).__name__}"])
    return d


def build_config(
    d: dict | None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> TrainConfig:
    """Validate a config dict (plus overrides); raise ConfigError listing every problem."""
    return validate_config(TrainConfig, d, overrides, values)


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> TrainConfig:
    """Read a YAML config file (or start empty when path is None) and apply dotted overrides."""
    return build_config(read_yaml(path) if path is not None else {}, overrides, values)


def preset_dir() -> Path:
    """Where the shipped YAML presets live (jobs/presets)."""
    import jobs

    return Path(jobs.__file__).parent / "presets"
