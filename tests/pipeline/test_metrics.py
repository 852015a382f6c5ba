"""Metric values against hand-computed cases: perfect, random (constant), inverted scorers,
a known calibration case, NDCG by hand, single-class robustness and the query bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics import (
    MetricConfig,
    best_f1_threshold,
    bootstrap,
    brier,
    calibration_bins,
    ece,
    logloss,
    macro_average,
    macro_delta,
    ndcg_per_query,
    point_metrics,
    pr_auc,
    query_groups,
    roc_auc,
    threshold_metrics,
)

Y = np.array([0, 0, 1, 1])
GROUPS4 = np.array([0, 1, 2, 3])


def test_perfect_random_and_inverted_scorers():
    perfect = np.array([0.1, 0.2, 0.8, 0.9])
    assert roc_auc(Y, perfect) == 1.0 and pr_auc(Y, perfect) == 1.0
    # A constant score ranks nothing: AUC 0.5, AP = the positive rate.
    const = np.full(4, 0.5)
    assert roc_auc(Y, const) == 0.5 and pr_auc(Y, const) == 0.5
    inverted = perfect[::-1].copy()  # [.9, .8, .2, .1]: every positive below every negative
    assert roc_auc(Y, inverted) == 0.0
    # AP by hand: cut at .2 -> recall 1/2, precision 1/3; at .1 -> recall 1, precision 2/4.
    assert pr_auc(Y, inverted) == pytest.approx(0.5 * (1 / 3) + 0.5 * 0.5)


def test_roc_auc_with_ties_and_a_mixed_case():
    # Pairs (neg, pos): (.3,.3) tie 1/2, (.3,.6) 1, (.6,.3) 0, (.6,.6) tie 1/2 -> 2/4.
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.3, 0.3, 0.6, 0.6])) == 0.5
    # negatives .1, .35; positives .4, .8, .2: 5 of 6 pairs ordered -> 5/6.
    y = np.array([0, 1, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    assert roc_auc(y, p) == pytest.approx(5 / 6)


def test_log_loss_brier_and_threshold_metrics_by_hand():
    y, p = np.array([1, 0]), np.array([0.8, 0.3])
    assert logloss(y, p) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert brier(y, p) == pytest.approx((0.2**2 + 0.3**2) / 2)
    assert math.isfinite(logloss(np.array([1, 0]), np.array([1.0, 0.0])))  # clipped, not inf

    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.2, 0.7, 0.4, 0.6, 0.9])
    m = threshold_metrics(y, p, 0.5)  # predicted [0,1,0,1,1]: TP 2, FP 1, FN 1
    assert m == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    assert best_f1_threshold(Y, np.array([0.1, 0.2, 0.8, 0.9])) == 0.8
    assert threshold_metrics(Y, np.array([0.1, 0.2, 0.8, 0.9]), 0.8)["f1"] == 1.0


def test_calibration_known_cases():
    # Two bins, each 0.1 away from its observed rate: ECE = 0.5*0.1 + 0.5*0.1.
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9])
    assert ece(y, p, 10) == pytest.approx(0.1)
    assert brier(y, p) == pytest.approx(0.01)
    # Perfectly calibrated: 0.25 predicted where 2 of 8 are positive.
    assert ece(np.array([1, 1, 0, 0, 0, 0, 0, 0]), np.full(8, 0.25), 10) == pytest.approx(0.0)
    # Over-confident: 0.9 predicted, 50 % observed -> 0.4; p = 1.0 lands in the last bin.
    assert ece(np.array([1, 0] * 5), np.full(10, 0.9)) == pytest.approx(0.4)
    bins = calibration_bins(np.array([1, 0]), np.array([1.0, 0.0]), 4)
    assert bins["weight"].tolist() == [1, 0, 0, 1] and bins["frac_pos"][3] == 1.0
    assert np.isnan(bins["mean_pred"][1])


def test_ndcg_by_hand():
    # Query 0: grades [3,2,0], scores rank them 0,2,3 -> DCG = 0 + 2/log2(3) + 3/log2(4);
    # ideal 3 + 2/log2(3). Query 1: all grades equal (no information): left out.
    # Query 2: a single candidate: left out. Query 3: perfectly ranked -> 1.
    grades = np.array([3, 2, 0, 1, 1, 2, 2, 0], dtype=float)
    scores = np.array([0.1, 0.5, 0.9, 0.3, 0.4, 0.7, 0.9, 0.1])
    groups = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    q0 = (2 / math.log2(3) + 3 / 2) / (3 + 2 / math.log2(3))
    value, used, why = ndcg_per_query(grades, scores, groups, k=10)
    assert (used, why) == (2, None)
    assert value == pytest.approx((q0 + 1.0) / 2)
    # @1: query 0's top row has grade 0 -> 0; query 3 -> 1.
    assert ndcg_per_query(grades, scores, groups, k=1)[0] == pytest.approx(0.5)
    assert ndcg_per_query(np.full(8, np.nan), scores, groups, 5)[2] == "no grades"
    assert "negative" in ndcg_per_query(grades - 5, scores, groups, 5)[2]


def test_single_class_is_nan_with_a_reason_not_a_crash():
    y = np.zeros(6, dtype=int)
    p = np.linspace(0.1, 0.6, 6)
    m = point_metrics(y, p, np.arange(6), grades=None, cfg=MetricConfig(n_boot=0))
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    assert m["undefined"]["roc_auc"] == "single class: no positive labels"
    assert m["undefined"]["ndcg@5"] == "no grades"
    assert math.isfinite(m["log_loss"]) and math.isfinite(m["brier"]) and math.isfinite(m["ece"])
    assert math.isnan(m["threshold"]) and "threshold" in m["undefined"]
    assert m["rows"] == 6 and m["positives"] == 0 and m["positive_rate"] == 0.0
    boot = bootstrap(y, {"model": p}, np.arange(6), MetricConfig(n_boot=30))
    lo, hi, why = boot.interval("model", "roc_auc")
    assert math.isnan(lo) and math.isnan(hi) and "both classes" in why
    lo, hi, why = boot.interval("model", "brier")  # defined without both classes
    assert why is None and lo <= hi


def test_point_metrics_table():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    groups = np.repeat(np.arange(40), 5)
    grades = y * 2.0 + rng.integers(0, 2, 200)
    m = point_metrics(y, p, groups, grades, threshold=0.5)
    assert (m["rows"], m["queries"], m["positives"]) == (200, 40, int(y.sum()))
    assert m["roc_auc"] == roc_auc(y, p) and m["pr_auc"] == pr_auc(y, p)
    assert m["threshold"] == 0.5 and m == {**m, **threshold_metrics(y, p, 0.5)}
    assert 0 < m["ndcg@5"] <= 1 and m["ndcg_queries"] > 30 and not m["undefined"]


def test_query_groups_fall_back_to_query_text():
    g = query_groups(["a", None, "a", None], ["x", "y", "z", "y"])
    assert g[0] == g[2] and g[1] == g[3] and g[0] != g[1]
    g = query_groups(None, ["x", "y", "x"])
    assert g.tolist() == [0, 1, 0]
    with pytest.raises(ValueError):
        query_groups(None, None)


def test_bootstrap_over_queries():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), 4)  # 30 queries x 4 rows
    y = rng.integers(0, 2, 120)
    good = 0.3 * y + 0.7 * rng.random(120)
    noise = rng.random(120)
    cfg = MetricConfig(n_boot=100, seed=3)
    boot = bootstrap(y, {"good": good, "noise": noise}, groups, cfg)
    lo, hi, why = boot.interval("good", "roc_auc")
    assert why is None and lo < roc_auc(y, good) < hi and hi - lo < 0.3
    perfect = bootstrap(y, {"p": y * 0.8 + 0.1}, groups, MetricConfig(n_boot=20))
    assert perfect.interval("p", "roc_auc")[:2] == (1.0, 1.0)
    # Paired: the same resamples for every model, so a model minus itself is exactly 0.
    assert boot.delta("good", "good", "pr_auc")[:2] == (0.0, 0.0)
    lo, hi, _ = boot.delta("good", "noise", "roc_auc")
    assert 0 < lo < hi  # the good scorer is significantly better than noise
    # Same seed, same intervals; another seed, other intervals.
    again = bootstrap(y, {"good": good}, groups, cfg)
    assert again.interval("good", "roc_auc") == boot.interval("good", "roc_auc")
    other = bootstrap(y, {"good": good}, groups, MetricConfig(n_boot=100, seed=4))
    assert other.interval("good", "roc_auc") != boot.interval("good", "roc_auc")


def test_bootstrap_weights_equal_copied_rows():
    # A resample is applied as row weights; it must equal scoring the copied rows.
    y = np.array([0, 1, 0, 1, 1, 0])
    p = np.array([0.2, 0.6, 0.4, 0.9, 0.3, 0.5])
    w = np.array([2.0, 2.0, 0.0, 1.0, 3.0, 1.0])
    rep = np.repeat(np.arange(6), w.astype(int))
    assert roc_auc(y, p, w) == pytest.approx(roc_auc(y[rep], p[rep]))
    assert pr_auc(y, p, w) == pytest.approx(pr_auc(y[rep], p[rep]))
    assert ece(y, p, 10, w) == pytest.approx(ece(y[rep], p[rep], 10))


def test_macro_average_skips_undefined_tasks():
    per_task = {"a": {"roc_auc": 0.8, "f1": 0.5}, "b": {"roc_auc": float("nan"), "f1": 0.7}}
    m = macro_average(per_task, ("roc_auc", "f1"))
    assert m["roc_auc"] == 0.8 and m["roc_auc_tasks"] == 1
    assert m["f1"] == pytest.approx(0.6) and m["f1_tasks"] == 2
    lo, hi = macro_delta([np.array([0.1, 0.2, 0.3]), np.array([0.3, np.nan, 0.1])], ci=0.5)
    assert 0.15 <= lo <= hi <= 0.25  # per resample: mean of tasks -> [0.2, 0.2, 0.2]


def test_metric_config_validated():
    with pytest.raises(ValueError) as e:
        MetricConfig(n_bins=0, n_boot=-1, ci=1.5)
    assert "n_bins" in str(e.value) and "n_boot" in str(e.value) and "ci" in str(e.value)
