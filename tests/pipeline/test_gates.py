"""Release gates: relative (against a champion) and absolute (first model), with reasons."""

from __future__ import annotations

import pytest

from pipeline.gates import GateConfig, GateConfigError, judge

CHAMP = {
    "rows": 500,
    "roc_auc": 0.800,
    "pr_auc": 0.600,
    "ece": 0.030,
    "log_loss": 0.40,
    "brier": 0.12,
}


def challenger(**changes) -> dict:
    return {**CHAMP, **changes}


def test_within_tolerance_passes():
    v = judge("exact", challenger(roc_auc=0.799, pr_auc=0.601, ece=0.035), GateConfig(), CHAMP)
    assert v.passed and v.verdict == "pass" and v.mode == "relative"
    assert {c.gate for c in v.checks} == {"max_roc_auc_drop", "max_pr_auc_drop", "max_ece_rise"}
    assert all(c.passed for c in v.checks)


@pytest.mark.parametrize(
    ("changes", "gate", "text"),
    [
        (
            {"roc_auc": 0.797},
            "max_roc_auc_drop",
            "ROC-AUC 0.8000 → 0.7970 (-0.0030): dropped more than the allowed 0.002",
        ),
        (
            {"pr_auc": 0.5999},
            "max_pr_auc_drop",
            "PR-AUC 0.6000 → 0.5999 (-0.0001): dropped more than the allowed 0",
        ),
        (
            {"ece": 0.045},
            "max_ece_rise",
            "ECE 0.0300 → 0.0450 (+0.0150): rose more than the allowed 0.01",
        ),
    ],
)
def test_each_default_gate_fails_with_its_reason(changes, gate, text):
    v = judge("exact", challenger(**changes), GateConfig(), CHAMP)
    assert not v.passed and v.verdict == "fail"
    failed = [c for c in v.checks if not c.passed]
    assert [c.gate for c in failed] == [gate]
    assert v.reasons == [text]


def test_boundary_is_inclusive():
    assert judge("t", challenger(roc_auc=0.798), GateConfig(), CHAMP).passed  # exactly 0.002
    assert judge("t", challenger(ece=0.040), GateConfig(), CHAMP).passed  # exactly 0.01


def test_optional_gates_and_switching_off():
    cfg = GateConfig(max_log_loss_rise=0.01, max_brier_rise=0.0, max_roc_auc_drop=None)
    v = judge("t", challenger(roc_auc=0.5, log_loss=0.42, brier=0.11), cfg, CHAMP)
    assert "max_roc_auc_drop" not in {c.gate for c in v.checks}
    assert [c.gate for c in v.checks if not c.passed] == ["max_log_loss_rise"]


def test_use_ci_fails_only_significant_regressions():
    cfg = GateConfig(use_ci=True)
    noisy = {
        "roc_auc": {"delta": -0.003, "ci": [-0.010, 0.004]},
        "pr_auc": {"delta": 0.0, "ci": [-0.01, 0.01]},
        "ece": {"delta": 0.0, "ci": [-0.01, 0.01]},
    }
    assert judge("t", challenger(roc_auc=0.797), cfg, CHAMP, noisy).passed
    sure = {**noisy, "roc_auc": {"delta": -0.008, "ci": [-0.012, -0.005]}}
    v = judge("t", challenger(roc_auc=0.792), cfg, CHAMP, sure)
    assert not v.passed and "CI [-0.0120, -0.0050]" in v.reasons[0]
    v = judge("t", challenger(), cfg, CHAMP, {})  # no CI to judge by: fail, never pass silently
    assert not v.passed and "no bootstrap CI" in v.reasons[0]


def test_undefined_metric_fails_its_gate():
    new = challenger(roc_auc=None, undefined={"roc_auc": "single class: no positive labels"})
    v = judge("t", new, GateConfig(), CHAMP)
    assert not v.passed
    assert "ROC-AUC cannot be compared (single class: no positive labels)" in v.reasons
    v = judge("t", {"rows": 10, "roc_auc": float("nan")}, GateConfig(max_ece=None))
    assert not v.passed and v.reasons == ["ROC-AUC undefined (not computed)"]


def test_first_model_uses_absolute_bars():
    ok = judge("t", challenger(roc_auc=0.70, ece=0.05), GateConfig())
    assert ok.passed and ok.mode == "absolute"
    assert {c.gate for c in ok.checks} == {"min_roc_auc", "max_ece"}
    low = judge("t", challenger(roc_auc=0.55), GateConfig())
    assert not low.passed and low.reasons == ["ROC-AUC 0.5500 misses the bar >= 0.6"]
    cfg = GateConfig(min_pr_auc=0.7, absolute_always=True)
    both = judge("t", challenger(), cfg, CHAMP)
    assert {c.gate for c in both.checks} >= {"max_roc_auc_drop", "min_roc_auc", "min_pr_auc"}
    assert [c.gate for c in both.checks if not c.passed] == ["min_pr_auc"]


def test_min_rows():
    v = judge("t", challenger(rows=20), GateConfig(min_rows=100), CHAMP)
    assert not v.passed and "only 20 rows evaluated" in v.reasons[0]


def test_overrides_parse_and_report_every_error():
    cfg = GateConfig.from_overrides(
        ["max_roc_auc_drop=0.01", "max_ece=none", "use_ci=true", "min_rows=50"]
    )
    assert (cfg.max_roc_auc_drop, cfg.max_ece, cfg.use_ci, cfg.min_rows) == (0.01, None, True, 50)
    assert GateConfig.from_overrides({"max_pr_auc_drop": "0.001"}).max_pr_auc_drop == 0.001
    with pytest.raises(GateConfigError) as e:
        GateConfig.from_overrides(
            ["max_roc_auc_drop=abc", "nope=1", "use_ci=maybe", "min_rows=-3", "max_ece=nan"]
        )
    msg = str(e.value)
    assert "max_roc_auc_drop must be a number or none, got 'abc'" in msg
    assert "unknown gate 'nope'" in msg and "use_ci must be true or false" in msg
    # Values that parse but are out of range are listed with the ones that do not parse.
    assert "min_rows must be an integer >= 0, got -3" in msg
    assert "max_ece must be a number or none, got nan" in msg
    with pytest.raises(GateConfigError, match="not key=value"):
        GateConfig.from_overrides(["max_ece"])
    with pytest.raises(GateConfigError) as e:
        GateConfig(max_ece_rise=-1, min_roc_auc=1.5)
    assert "max_ece_rise must be >= 0" in str(e.value) and "min_roc_auc must be <= 1" in str(
        e.value
    )


def test_verdict_to_dict():
    d = judge("exact", challenger(roc_auc=0.7), GateConfig(), CHAMP).to_dict()
    assert d["task"] == "exact" and d["verdict"] == "fail" and d["passed"] is False
    assert d["reasons"] and d["checks"][0]["gate"] == "max_roc_auc_drop"
