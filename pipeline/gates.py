"""Release gates: may a challenger replace the champion for a task? A verdict with reasons.

With a champion for the task the gates are relative (how much each metric may move the wrong
way); for a first model (no champion, or a champion that lacks the task) they are absolute
bars. A metric that cannot be computed fails its gate: a verdict is never "pass" by default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

# Relative gates: (config field, metric, direction). "drop" metrics are higher-is-better.
_RELATIVE = (
    ("max_roc_auc_drop", "roc_auc", "drop"),
    ("max_pr_auc_drop", "pr_auc", "drop"),
    ("max_ece_rise", "ece", "rise"),
    ("max_log_loss_rise", "log_loss", "rise"),
    ("max_brier_rise", "brier", "rise"),
)
# Absolute bars: (config field, metric, kind).
_ABSOLUTE = (
    ("min_roc_auc", "roc_auc", "min"),
    ("min_pr_auc", "pr_auc", "min"),
    ("max_ece", "ece", "max"),
    ("max_log_loss", "log_loss", "max"),
)
LABELS = {
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
    "ece": "ECE",
    "log_loss": "log loss",
    "brier": "Brier",
}


class GateConfigError(ValueError):
    """Gate settings are invalid; the message lists every bad key and value."""


@dataclass
class GateConfig:
    """Thresholds of the release gates (None switches a gate off).

    Relative, against the champion, per task (delta = challenger − champion):
    max_roc_auc_drop: ROC-AUC may fall by at most this much.
    max_pr_auc_drop: PR-AUC may fall by at most this much (0: must not drop).
    max_ece_rise / max_log_loss_rise / max_brier_rise: calibration may worsen by at most this.
    use_ci: judge the paired-bootstrap CI instead of the point delta: a gate fails only when
        the whole interval is beyond the tolerance (a significant regression).
    Absolute bars, for a first model (no champion for the task) and, with
    absolute_always, for every model:
    min_roc_auc, min_pr_auc, max_ece, max_log_loss.
    min_rows: fewer evaluated rows than this fails the task (too little evidence).
    """

    max_roc_auc_drop: float | None = 0.002
    max_pr_auc_drop: float | None = 0.0
    max_ece_rise: float | None = 0.01
    max_log_loss_rise: float | None = None
    max_brier_rise: float | None = None
    use_ci: bool = False
    min_roc_auc: float | None = 0.6
    min_pr_auc: float | None = None
    max_ece: float | None = 0.15
    max_log_loss: float | None = None
    absolute_always: bool = False
    min_rows: int = 1

    def __post_init__(self) -> None:
        errors = self.errors()
        if errors:
            raise GateConfigError("invalid gate configuration:\n  - " + "\n  - ".join(errors))

    def errors(self) -> list[str]:
        return _value_errors(asdict(self))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_overrides(cls, overrides: dict[str, str] | list[str], base: GateConfig | None = None):
        """Apply `key=value` strings (CLI `--gates`) on top of `base`; all errors at once.

        Values: numbers, `none`/`off` (gate disabled), `true`/`false` for the switches.
        """
        items = _pairs(overrides)
        current = asdict(base or cls())
        known = {f.name: f for f in fields(cls)}
        errors = []
        for key, raw in items:
            if key not in known:
                errors.append(f"unknown gate {key!r}; known gates: {sorted(known)}")
                continue
            try:
                current[key] = _parse(key, raw)
            except ValueError as exc:
                errors.append(str(exc))
        errors += _value_errors(current)  # out-of-range values too, in the same message
        if errors:
            raise GateConfigError("invalid gate configuration:\n  - " + "\n  - ".join(errors))
        return cls(**current)


def _value_errors(values: dict) -> list[str]:
    """Every bad value among the gate settings (a dict of GateConfig's fields)."""
    e = []
    for name, v in values.items():
        if name in ("use_ci", "absolute_always"):
            if not isinstance(v, bool):
                e.append(f"{name} must be true or false, got {v!r}")
        elif name == "min_rows":
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                e.append(f"min_rows must be an integer >= 0, got {v!r}")
        elif v is not None and (
            not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
        ):
            e.append(f"{name} must be a number or none, got {v!r}")
        elif v is not None and name.startswith(("max_", "min_")) and v < 0:
            e.append(f"{name} must be >= 0, got {v!r}")
    for name in ("min_roc_auc", "min_pr_auc"):
        v = values.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1:
            e.append(f"{name} must be <= 1, got {v!r}")
    return e


def _pairs(overrides: dict[str, str] | list[str]) -> list[tuple[str, str]]:
    if isinstance(overrides, dict):
        return [(str(k), str(v)) for k, v in overrides.items()]
    out = []
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise GateConfigError(f"gate override {item!r} is not key=value")
        out.append((key.strip(), value.strip()))
    return out


def _parse(key: str, raw: str):
    low = raw.lower()
    if key in ("use_ci", "absolute_always"):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} must be true or false, got {raw!r}")
    if key == "min_rows":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"min_rows must be an integer, got {raw!r}") from None
    if low in ("none", "off", "null", ""):
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number or none, got {raw!r}") from None


@dataclass
class Check:
    """One gate applied to one task."""

    gate: str
    metric: str
    value: float | None  # the delta (relative) or the metric (absolute)
    limit: float
    passed: bool
    message: str


@dataclass
class TaskVerdict:
    """Whether the task's model may ship, and why."""

    task: str
    passed: bool
    mode: str  # "relative" (against a champion) or "absolute" (first model)
    checks: list[Check] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def reasons(self) -> list[str]:
        """What failed (or, for a pass, what was checked)."""
        failed = [c.message for c in self.checks if not c.passed]
        return failed or [c.message for c in self.checks] or ["no gate configured"]

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "verdict": self.verdict,
            "passed": self.passed,
            "mode": self.mode,
            "reasons": self.reasons,
            "checks": [asdict(c) for c in self.checks],
        }


def judge(
    task: str,
    metrics: dict,
    cfg: GateConfig,
    baseline: dict | None = None,
    deltas: dict | None = None,
) -> TaskVerdict:
    """The verdict for one task.

    metrics / baseline: point metrics of the challenger / champion (pipeline.metrics keys).
    deltas: per metric {"delta", "ci": [lo, hi]} (paired bootstrap); needed when use_ci.
    """
    mode = "relative" if baseline is not None else "absolute"
    checks: list[Check] = []
    rows = int(metrics.get("rows", 0))
    if rows < cfg.min_rows:
        checks.append(
            Check(
                "min_rows",
                "rows",
                rows,
                cfg.min_rows,
                False,
                f"only {rows} rows evaluated, fewer than min_rows={cfg.min_rows}",
            )
        )
    if baseline is not None:
        for gate, metric, direction in _RELATIVE:
            limit = getattr(cfg, gate)
            if limit is not None:
                checks.append(
                    _relative(gate, metric, direction, limit, metrics, baseline, deltas, cfg)
                )
    if baseline is None or cfg.absolute_always:
        for gate, metric, kind in _ABSOLUTE:
            limit = getattr(cfg, gate)
            if limit is not None:
                checks.append(_absolute(gate, metric, kind, limit, metrics))
    return TaskVerdict(task, all(c.passed for c in checks), mode, checks)


def _relative(gate, metric, direction, limit, new, old, deltas, cfg: GateConfig) -> Check:
    label = LABELS[metric]
    a, b = old.get(metric), new.get(metric)
    if not (_finite(a) and _finite(b)):
        why = (new.get("undefined") or {}).get(metric) or (old.get("undefined") or {}).get(metric)
        return Check(
            gate,
            metric,
            None,
            limit,
            False,
            f"{label} cannot be compared ({why or 'not computed'})",
        )
    delta = b - a
    worse = -delta if direction == "drop" else delta  # > 0: moved the wrong way
    judged, basis = worse, ""
    if cfg.use_ci:
        ci = ((deltas or {}).get(metric) or {}).get("ci")
        if not ci or not all(_finite(x) for x in ci):
            return Check(
                gate,
                metric,
                delta,
                limit,
                False,
                f"{label}: no bootstrap CI for the delta (use_ci is on)",
            )
        # The best case the CI allows: the regression is significant only if even that is too much.
        judged = -ci[1] if direction == "drop" else ci[0]
        basis = f", CI [{ci[0]:+.4f}, {ci[1]:+.4f}]"
    passed = judged <= limit + 1e-12
    verb = "dropped" if direction == "drop" else "rose"
    moved = f"{label} {a:.4f} → {b:.4f} ({delta:+.4f}{basis})"
    if passed:
        msg = f"{moved}: within the allowed {direction} of {limit:g}"
    else:
        msg = f"{moved}: {verb} more than the allowed {limit:g}"
    return Check(gate, metric, delta, limit, passed, msg)


def _absolute(gate, metric, kind, limit, new) -> Check:
    label = LABELS[metric]
    v = new.get(metric)
    if not _finite(v):
        why = (new.get("undefined") or {}).get(metric, "not computed")
        return Check(gate, metric, None, limit, False, f"{label} undefined ({why})")
    passed = v >= limit - 1e-12 if kind == "min" else v <= limit + 1e-12
    rel = ">=" if kind == "min" else "<="
    msg = f"{label} {v:.4f} {'meets' if passed else 'misses'} the bar {rel} {limit:g}"
    return Check(gate, metric, v, limit, passed, msg)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
