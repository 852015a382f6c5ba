"""Offline relevance metrics for one task: ranking, calibration, thresholded and per-query.

AUCs, log loss, precision/recall/F1 and NDCG come from scikit-learn; ECE and the weighted
Brier/log-loss used inside the bootstrap are a few lines of numpy. Confidence intervals
resample whole queries (rows of one query are not independent), and the champion–challenger
deltas are *paired*: both models are measured on the same resampled queries.

A metric that is undefined on the rows given (one class only, no grades, too few queries) is
NaN, with the reason in the result's `undefined` map, never an exception.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import sklearn
from sklearn.metrics import (
    auc,
    average_precision_score,
    f1_score,
    log_loss,
    ndcg_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

NAN = float("nan")
# Metrics resampled by the bootstrap; the first two get CIs in the tables, all get paired deltas.
BOOTSTRAP_METRICS = ("roc_auc", "pr_auc", "log_loss", "brier", "ece")
# Metrics where larger is better (a negative delta is a regression); the others: smaller is better.
HIGHER_IS_BETTER = {
    "roc_auc": True,
    "pr_auc": True,
    "log_loss": False,
    "brier": False,
    "ece": False,
}
HIGHER_IS_BETTER.update({"precision": True, "recall": True, "f1": True})
# Per-task keys averaged across tasks (macro).
MACRO_KEYS = (
    "roc_auc",
    "pr_auc",
    "log_loss",
    "brier",
    "ece",
    "precision",
    "recall",
    "f1",
    "ndcg@5",
    "ndcg@10",
)
_EPS = 1e-7  # probabilities are clipped to [eps, 1-eps] for log loss (float32 scores hit 1.0)


@dataclass(frozen=True)
class MetricConfig:
    """How metrics are computed.

    n_bins: equal-width probability bins for ECE and the reliability diagram.
    ndcg_ks: cut-offs for NDCG (computed per query where grades exist).
    n_boot: bootstrap resamples over queries (CIs and paired deltas); 0 disables them.
    ci: two-sided confidence level of the percentile intervals.
    seed: bootstrap seed (same seed, same intervals).
    min_valid_fraction: a CI needs at least this share of resamples with both classes.
    """

    n_bins: int = 10
    ndcg_ks: tuple[int, ...] = (5, 10)
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    min_valid_fraction: float = 0.5

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.n_bins, int) or self.n_bins < 1:
            errors.append(f"n_bins must be an integer >= 1, got {self.n_bins!r}")
        if not self.ndcg_ks or any(not isinstance(k, int) or k < 1 for k in self.ndcg_ks):
            errors.append(f"ndcg_ks must be positive integers, got {self.ndcg_ks!r}")
        if not isinstance(self.n_boot, int) or self.n_boot < 0:
            errors.append(f"n_boot must be an integer >= 0, got {self.n_boot!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            errors.append(f"seed must be an integer >= 0, got {self.seed!r}")
        if not 0 < self.ci < 1:
            errors.append(f"ci must be in (0, 1), got {self.ci!r}")
        if not 0 < self.min_valid_fraction <= 1:
            errors.append(f"min_valid_fraction must be in (0, 1], got {self.min_valid_fraction!r}")
        if errors:
            raise ValueError("invalid metric configuration: " + "; ".join(errors))


# ---------------------------------------------------------------------------- groups


def query_groups(query_id=None, query=None) -> np.ndarray:
    """(N,) int codes of the query each row belongs to: query_id where given, else the text."""
    import pandas as pd

    if query_id is not None:
        qid = pd.Series(query_id, dtype=object)
        if query is not None:
            # Rows without an id fall back to their query text (prefixed: ids and texts never mix).
            qid = qid.where(qid.notna(), "text:" + pd.Series(query, dtype=object).astype(str))
        keys = qid.astype(str)
    elif query is not None:
        keys = pd.Series(query, dtype=object).astype(str)
    else:
        raise ValueError("query_groups needs query_id or query")
    codes, _ = pd.factorize(keys, sort=False)
    return codes.astype(np.int64)


# ---------------------------------------------------------------------------- point metrics


def class_problem(y: np.ndarray, w: np.ndarray | None = None) -> str | None:
    """Why ranking metrics are undefined on these labels, or None when both classes exist."""
    w = np.ones(len(y)) if w is None else w
    if len(y) == 0 or w.sum() == 0:
        return "no rows"
    pos = float(w[y == 1].sum())
    if pos == 0:
        return "single class: no positive labels"
    if pos == float(w.sum()):
        return "single class: no negative labels"
    return None


def roc_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    if class_problem(y, w):
        return NAN
    return float(roc_auc_score(y, p, sample_weight=w))


def pr_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """Average precision (the step-wise area under the PR curve, as scikit-learn defines it)."""
    if class_problem(y, w):
        return NAN
    return float(average_precision_score(y, p, sample_weight=w))


def logloss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    if len(y) == 0:
        return NAN
    return float(log_loss(y, np.clip(p, _EPS, 1 - _EPS), sample_weight=w, labels=[0, 1]))


def brier(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """Weighted mean squared error of the probability (same as sklearn's brier_score_loss)."""
    if len(y) == 0:
        return NAN
    return float(np.average((p - y) ** 2, weights=w))


def calibration_bins(
    y: np.ndarray, p: np.ndarray, n_bins: int = 10, w: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Equal-width bins over [0, 1]: weight, mean predicted probability, observed positive rate.

    Empty bins hold NaN means and weight 0. p == 1.0 falls in the last bin.
    """
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    idx = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)  # (N,)
    weight = np.bincount(idx, weights=w, minlength=n_bins)  # (n_bins,)
    sum_p = np.bincount(idx, weights=w * p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=w * y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(weight > 0, sum_p / weight, np.nan)
        frac_pos = np.where(weight > 0, sum_y / weight, np.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"edges": edges, "weight": weight, "mean_pred": mean_p, "frac_pos": frac_pos}


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 10, w: np.ndarray | None = None) -> float:
    """Expected calibration error: Σ_b (n_b / N) · |mean p_b − positive rate_b| over bins."""
    bins = calibration_bins(y, p, n_bins, w)
    total = bins["weight"].sum()
    if total == 0:
        return NAN
    full = bins["weight"] > 0
    gap = np.abs(bins["mean_pred"][full] - bins["frac_pos"][full])
    return float((bins["weight"][full] / total * gap).sum())


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The score threshold (predict 1 when p >= t) with the best F1 on these rows; NaN if none."""
    if class_problem(y):
        return NAN
    precision, recall, thresholds = precision_recall_curve(y, p)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = np.nan_to_num(f1[:-1], nan=0.0)  # the last PR point has no threshold
    return float(thresholds[int(np.argmax(f1))])


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 when rows with p >= threshold are called relevant."""
    if len(y) == 0 or not np.isfinite(threshold):
        return {"precision": NAN, "recall": NAN, "f1": NAN}
    pred = (p >= threshold).astype(np.int64)
    kw = {"zero_division": np.nan}
    return {
        "precision": float(precision_score(y, pred, **kw)),
        "recall": float(recall_score(y, pred, **kw)),
        "f1": float(f1_score(y, pred, **kw)),
    }


def ndcg_per_query(
    grades: np.ndarray, p: np.ndarray, groups: np.ndarray, k: int
) -> tuple[float, int, str | None]:
    """Mean NDCG@k over queries: (mean, queries used, reason when undefined).

    Queries with one candidate or with all grades equal carry no ranking information and are
    left out; rows with a missing grade are ignored.
    """
    keep = np.isfinite(grades)
    if not keep.any():
        return NAN, 0, "no grades"
    if (grades[keep] < 0).any():
        return NAN, 0, "negative grades (NDCG needs non-negative gains)"
    g, s, q = grades[keep], p[keep], groups[keep]
    order = np.argsort(q, kind="stable")
    g, s, q = g[order], s[order], q[order]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    ends = np.r_[starts[1:], len(q)]
    # Queries of equal size go to ndcg_score together (one call per size, not per query).
    by_size: dict[int, list[int]] = {}
    for a, b in zip(starts, ends):
        if b - a >= 2 and g[a:b].min() != g[a:b].max():
            by_size.setdefault(int(b - a), []).append(int(a))
    total, used = 0.0, 0
    for size, firsts in by_size.items():
        rows = np.asarray(firsts)[:, None] + np.arange(size)[None, :]  # (Q_size, size)
        total += ndcg_score(g[rows], s[rows], k=k) * len(firsts)
        used += len(firsts)
    if not used:
        return NAN, 0, "no query with two or more candidates of different grades"
    return total / used, used, None


def point_metrics(
    y: np.ndarray,
    p: np.ndarray,
    groups: np.ndarray,
    grades: np.ndarray | None = None,
    threshold: float | None = None,
    cfg: MetricConfig | None = None,
) -> dict:
    """Every table metric of one model on one task's rows (no CIs: see `bootstrap`).

    `threshold` None: the F1-best threshold on these very rows (optimistic; callers say so).
    """
    cfg = cfg or MetricConfig()
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    undefined: dict[str, str] = {}
    out: dict = {
        "rows": len(y),
        "queries": len(np.unique(groups)),
        "positives": int(y.sum()),
        "positive_rate": float(y.mean()) if len(y) else NAN,
    }
    problem = class_problem(y)
    out["roc_auc"], out["pr_auc"] = roc_auc(y, p), pr_auc(y, p)
    if problem:
        undefined["roc_auc"] = undefined["pr_auc"] = problem
    out["log_loss"], out["brier"], out["ece"] = logloss(y, p), brier(y, p), ece(y, p, cfg.n_bins)
    thr = best_f1_threshold(y, p) if threshold is None else float(threshold)
    out["threshold"] = thr
    out.update(threshold_metrics(y, p, thr))
    if not np.isfinite(thr):
        undefined["threshold"] = problem or "no threshold"
    for name in ("precision", "recall", "f1"):
        if not np.isfinite(out[name]) and name not in undefined:
            undefined[name] = _prf_reason(name, y, p, thr)
    for k in cfg.ndcg_ks:
        if grades is None:
            out[f"ndcg@{k}"], n_q, why = NAN, 0, "no grades"
        else:
            out[f"ndcg@{k}"], n_q, why = ndcg_per_query(
                np.asarray(grades, dtype=np.float64), p, groups, k
            )
        out["ndcg_queries"] = n_q
        if why:
            undefined[f"ndcg@{k}"] = why
    out["undefined"] = undefined
    return out


def _prf_reason(name: str, y: np.ndarray, p: np.ndarray, thr: float) -> str:
    if not np.isfinite(thr):
        return "no threshold"
    if name == "precision" or (name == "f1" and not (p >= thr).any()):
        return "no row scored above the threshold"
    return "no positive labels"


# ---------------------------------------------------------------------------- bootstrap


@dataclass
class Bootstrap:
    """Metric values of each model on the same query resamples.

    samples[model][metric]: (n_boot,) float, NaN where the resample had one class only.
    """

    samples: dict[str, dict[str, np.ndarray]]
    n_boot: int
    ci: float
    min_valid_fraction: float

    def interval(self, model: str, metric: str) -> tuple[float, float, str | None]:
        return self._percentiles(self.samples[model][metric])

    def delta(self, model: str, baseline: str, metric: str) -> tuple[float, float, str | None]:
        """CI of metric(model) − metric(baseline), paired over the same resamples."""
        return self._percentiles(self.samples[model][metric] - self.samples[baseline][metric])

    def delta_samples(self, model: str, baseline: str, metric: str) -> np.ndarray:
        return self.samples[model][metric] - self.samples[baseline][metric]

    def _percentiles(self, values: np.ndarray) -> tuple[float, float, str | None]:
        return percentile_interval(values, self.ci, self.min_valid_fraction)


def percentile_interval(
    values: np.ndarray, ci: float = 0.95, min_valid_fraction: float = 0.5
) -> tuple[float, float, str | None]:
    """(lo, hi, reason): the percentile interval of the finite values, NaN with a reason."""
    if len(values) == 0:
        return NAN, NAN, "no bootstrap resamples"
    finite = values[np.isfinite(values)]
    if len(finite) < min_valid_fraction * len(values):
        return (
            NAN,
            NAN,
            f"only {len(finite)} of {len(values)} resamples had both classes",
        )
    lo, hi = np.percentile(finite, [50 * (1 - ci), 50 * (1 + ci)])
    return float(lo), float(hi), None


def bootstrap(
    y: np.ndarray,
    scores: dict[str, np.ndarray],
    groups: np.ndarray,
    cfg: MetricConfig | None = None,
    metrics: tuple[str, ...] = BOOTSTRAP_METRICS,
) -> Bootstrap:
    """Resample queries with replacement (n_boot times); measure every model on each resample.

    A resample is a multiplicity per query, applied as row weights: no rows are copied.
    """
    cfg = cfg or MetricConfig()
    y = np.asarray(y, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if len(groups) != len(y) or any(len(p) != len(y) for p in scores.values()):
        raise ValueError("bootstrap needs labels, groups and every score array of one length")
    if any(not np.isfinite(np.asarray(p, dtype=np.float64)).all() for p in scores.values()):
        raise ValueError("bootstrap scores must be finite")
    n_q = int(groups.max()) + 1 if len(groups) else 0
    rng = np.random.default_rng(cfg.seed)
    samples = {m: {k: np.full(cfg.n_boot, NAN) for k in metrics} for m in scores}
    probs = {m: np.asarray(p, dtype=np.float64) for m, p in scores.items()}
    if n_q == 0:
        return Bootstrap(samples, cfg.n_boot, cfg.ci, cfg.min_valid_fraction)
    # Inputs are validated once here; sklearn's per-call validation would otherwise cost
    # more than the metric itself on every resample.
    with (
        warnings.catch_warnings(),
        sklearn.config_context(assume_finite=True, skip_parameter_validation=True),
    ):
        warnings.simplefilter("ignore")
        for b in range(cfg.n_boot):
            counts = np.bincount(rng.integers(0, n_q, n_q), minlength=n_q)  # (Q,)
            w = counts[groups].astype(np.float64)  # (N,)
            keep = w > 0
            yb, wb = y[keep], w[keep]
            both = class_problem(yb, wb) is None
            for m, p in probs.items():
                pb = p[keep]
                for k in metrics:
                    samples[m][k][b] = _weighted(k, yb, pb, wb, both, cfg.n_bins)
    return Bootstrap(samples, cfg.n_boot, cfg.ci, cfg.min_valid_fraction)


def _weighted(name: str, y, p, w, both_classes: bool, n_bins: int) -> float:
    if name == "roc_auc":
        if not both_classes:
            return NAN
        fpr, tpr, _ = roc_curve(y, p, sample_weight=w)  # roc_curve + auc: less overhead
        return float(auc(fpr, tpr))
    if name == "pr_auc":
        return float(average_precision_score(y, p, sample_weight=w)) if both_classes else NAN
    if name == "log_loss":
        q = np.clip(p, _EPS, 1 - _EPS)
        return float(np.average(-(y * np.log(q) + (1 - y) * np.log1p(-q)), weights=w))
    if name == "brier":
        return brier(y, p, w)
    if name == "ece":
        return ece(y, p, n_bins, w)
    raise KeyError(f"no bootstrap implementation for metric {name!r}")


# ---------------------------------------------------------------------------- macro


def macro_average(per_task: dict[str, dict], keys: tuple[str, ...] = MACRO_KEYS) -> dict:
    """Unweighted mean over tasks of each metric (NaN tasks left out, counted in `tasks`)."""
    out: dict = {}
    for k in keys:
        vals = [m[k] for m in per_task.values() if _finite(m.get(k))]
        out[k] = float(np.mean(vals)) if vals else NAN
        out[f"{k}_tasks"] = len(vals)
    return out


def macro_delta(per_task_samples: list[np.ndarray], ci: float = 0.95) -> tuple[float, float]:
    """CI of the macro delta: per resample, the mean of the tasks' deltas (tasks independent)."""
    if not per_task_samples:
        return NAN, NAN
    stack = np.vstack(per_task_samples)  # (T, n_boot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macro = np.nanmean(stack, axis=0)  # (n_boot,)
    lo, hi, _ = percentile_interval(macro, ci)
    return lo, hi


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
