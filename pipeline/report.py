"""Render an evaluation (metrics.json content + predictions) as one self-contained HTML file.

Plots are matplotlib figures drawn on the Agg canvas and inlined as base64 PNG, so the report
is a single file that opens anywhere (mail, MLflow artifact view) without a server. Also the
plain-text summary table the CLI prints.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.metrics import calibration_bins

MODEL, BASELINE = "model", "baseline"
COLORS = {MODEL: "#1f77b4", BASELINE: "#ff7f0e"}
NAMES = {MODEL: "challenger", BASELINE: "champion"}
# Table columns: (key, header, digits).
TASK_COLUMNS = (
    ("rows", "Rows", 0),
    ("queries", "Queries", 0),
    ("positive_rate", "Pos. rate", 3),
    ("roc_auc", "ROC-AUC [95% CI]", 4),
    ("pr_auc", "PR-AUC [95% CI]", 4),
    ("log_loss", "Log loss", 4),
    ("brier", "Brier", 4),
    ("ece", "ECE", 4),
    ("threshold", "Thr.", 3),
    ("precision", "Precision", 3),
    ("recall", "Recall", 3),
    ("f1", "F1", 3),
    ("ndcg@5", "NDCG@5", 4),
    ("ndcg@10", "NDCG@10", 4),
)
# Where a threshold came from, as the table shows it (the Notes section explains).
SOURCE_SHORT = {
    "given": "given",
    "model metadata": "model",
    "best F1 on dev": "dev",
    "best F1 on this data (optimistic)": "eval*",
}
DELTA_COLUMNS = (
    ("roc_auc", "ROC-AUC", True),
    ("pr_auc", "PR-AUC", True),
    ("ece", "ECE", False),
    ("log_loss", "Log loss", False),
    ("brier", "Brier", False),
)
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px 32px;color:#1d1d1f;
 font-size:14px;line-height:1.45;max-width:1600px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:32px 0 8px;border-bottom:2px solid #e3e3e3;
 padding-bottom:4px} h3{font-size:16px;margin:20px 0 6px}
.meta{color:#555;margin:4px 0 14px} .meta td{padding:1px 14px 1px 0;vertical-align:top}
.meta td:first-child{font-weight:600;color:#333}
.banner{padding:12px 16px;border-radius:6px;font-size:17px;font-weight:600;margin:12px 0}
.pass{background:#e6f4ea;color:#0d652d;border:1px solid #a8dab5}
.fail{background:#fce8e6;color:#a50e0e;border:1px solid #f4b4ae}
table.t{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
table.t th{background:#f3f4f6;text-align:right;padding:5px 9px;border-bottom:2px solid #d0d4da;
 font-weight:600;white-space:nowrap}
table.t td{padding:4px 9px;border-bottom:1px solid #eceef1;text-align:right;white-space:nowrap}
table.t td.l,table.t th.l{text-align:left} table.t tr.macro td{font-weight:600;border-top:2px solid #d0d4da}
.ci{color:#777;font-size:12px} .na{color:#999} .good{color:#0d652d} .bad{color:#b3261e}
.sig{font-weight:700} .tag{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;
 font-weight:700} .tag.pass{border:none} .tag.fail{border:none}
ul.checks{margin:2px 0 10px;padding-left:20px} ul.checks li{margin:1px 0}
.ok::marker{content:"✓  ";color:#0d652d} .ko::marker{content:"✗  ";color:#b3261e}
img{max-width:100%;border:1px solid #eee;margin:4px 0}
.note{color:#555;font-size:13px} table.t td.reason{text-align:left;white-space:normal;
 max-width:640px;font-size:13px}
"""


# ---------------------------------------------------------------------------- public


def write_report(path: str | Path, metrics: dict, preds: pd.DataFrame) -> Path:
    """Write report.html for one evaluation (`metrics`: the metrics.json content)."""
    path = Path(path)
    path.write_text(render_html(metrics, preds), encoding="utf-8")
    return path


def render_html(metrics: dict, preds: pd.DataFrame) -> str:
    has_base = metrics.get("baseline") is not None
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>adrel evaluation report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Offline relevance evaluation</h1>",
        _meta(metrics),
        _banner(metrics),
        "<h2>Challenger metrics per task</h2>",
        _task_table(metrics, MODEL),
    ]
    if has_base:
        parts += [
            "<h2>Champion vs challenger</h2>",
            "<p class='note'>Δ = challenger − champion on the same rows; 95 % CI by paired "
            "bootstrap over queries. Green: better, red: worse; bold: the CI excludes 0.</p>",
            _delta_table(metrics),
            "<h3>Champion metrics per task</h3>",
            _task_table(metrics, BASELINE),
        ]
    parts += ["<h2>Gate verdicts</h2>", _verdicts(metrics)]
    parts += ["<h2>Curves per task</h2>", _curves(metrics, preds)]
    parts += ["<h2>Slices</h2>", _slices(metrics)]
    parts += ["<h2>MTL-LoRA diagnostics</h2>", _diagnostics(metrics.get("diagnostics"))]
    parts += ["<h2>Notes</h2>", _notes(metrics), "</body></html>"]
    return "\n".join(parts)


def format_summary(metrics: dict) -> str:
    """A plain-text table of the headline figures and verdicts (what the CLI prints)."""
    has_base = metrics.get("baseline") is not None
    head = ["task", "rows", "ROC-AUC", "PR-AUC", "ECE"]
    if has_base:
        head = ["task", "rows", "ROC-AUC", "ΔROC", "PR-AUC", "ΔPR", "ECE", "ΔECE"]
    head.append("verdict")
    lines = []
    for task, e in metrics["tasks"].items():
        m = e.get(MODEL) or {}
        row = [task, str(m.get("rows", ""))]
        for k in ("roc_auc", "pr_auc", "ece"):
            row.append(_num(m.get(k), 4))
            if has_base:
                d = ((e.get("delta") or {}).get(k) or {}).get("delta")
                row.append(_num(d, 4, signed=True) if e.get("delta") else "n/a")
        row.append(e["verdict"]["verdict"].upper())
        lines.append(row)
    macro = metrics["macro"].get(MODEL, {})
    mrow = [
        "macro",
        str(sum((e.get(MODEL) or {}).get("rows", 0) for e in metrics["tasks"].values())),
    ]
    for k in ("roc_auc", "pr_auc", "ece"):
        mrow.append(_num(macro.get(k), 4))
        if has_base:
            d = ((metrics["macro"].get("delta") or {}).get(k) or {}).get("delta")
            mrow.append(_num(d, 4, signed=True))
    mrow.append("FAIL" if metrics["gate_failed"] else "PASS")
    lines.append(mrow)
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    out = [fmt(head), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in lines[:-1]] + ["  ".join("-" * w for w in widths), fmt(lines[-1])]
    for task, e in metrics["tasks"].items():
        if not e["verdict"]["passed"]:
            out.append(f"{task} fails:")
            out += [f"  - {r}" for r in e["verdict"]["reasons"]]
    return "\n".join(out)


# ---------------------------------------------------------------------------- header


def _meta(metrics: dict) -> str:
    def model_line(info):
        if not info:
            return "—"
        bits = [f"<b>{_e(info['uri'])}</b> ({_e(info['kind'])})"]
        if info.get("registered_name"):
            bits.append(
                f"registered {_e(info['registered_name'])} v{_e(info['registered_version'])}"
            )
        if info.get("mlflow_run_id"):
            bits.append(f"run {_e(info['mlflow_run_id'])}")
        versions = (info.get("extra") or {}).get("task_versions")
        if versions:
            bits.append(", ".join(_e(v) for v in versions.values()))
        return " · ".join(bits)

    d = metrics["data"]
    q = d.get("rows_quarantined", 0)
    reasons = ", ".join(f"{_e(k)}: {v}" for k, v in (d.get("quarantine_reasons") or {}).items())
    rows = [
        ("Challenger", model_line(metrics["model"])),
        (
            "Champion",
            model_line(metrics.get("baseline"))
            if metrics.get("baseline")
            else "none (first model: absolute bars)",
        ),
        (
            "Data",
            f"{_e(d['dir'])} — {d['rows_evaluated']:,} rows evaluated of {d['rows_read']:,} read"
            + (f"; {q:,} quarantined ({reasons})" if q else ""),
        ),
        ("Tasks", ", ".join(_e(t) for t in metrics["tasks"])),
        ("Created", f"{_e(metrics.get('created', ''))} · {metrics.get('elapsed_s', '')} s"),
    ]
    return (
        "<table class='meta'>"
        + "".join(f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in rows)
        + "</table>"
    )


def _banner(metrics: dict) -> str:
    verdicts = metrics["verdicts"]
    failed = [t for t, v in verdicts.items() if v != "pass"]
    if failed:
        return (
            f"<div class='banner fail'>Gates: FAIL — {len(failed)} of {len(verdicts)} task(s) "
            f"fail: {_e(', '.join(failed))}</div>"
        )
    return f"<div class='banner pass'>Gates: PASS — all {len(verdicts)} task(s) pass</div>"


# ---------------------------------------------------------------------------- tables


def _task_table(metrics: dict, who: str) -> str:
    """One row per task (+ macro): the figures of one model. CIs sit under their value."""
    head = (
        "<tr><th class='l'>Task</th><th>Verdict</th>"
        if who == MODEL
        else "<tr><th class='l'>Task</th>"
    )
    head += "".join(f"<th>{h}</th>" for _, h, _ in TASK_COLUMNS) + "</tr>"
    n_cols = len(TASK_COLUMNS) + (who == MODEL)
    body = []
    for task, e in metrics["tasks"].items():
        m = e.get(who)
        cells = [f"<td class='l'><b>{_e(task)}</b></td>"]
        if who == MODEL:
            cells.append(f"<td>{_tag(e['verdict']['verdict'])}</td>")
        if not m:
            cells.append(f"<td class='l na' colspan='{n_cols}'>task not in this model</td>")
        else:
            cells += [_metric_cell(m, key, digits) for key, _, digits in TASK_COLUMNS]
        body.append("<tr>" + "".join(cells) + "</tr>")
    macro = metrics["macro"].get(who)
    if macro:
        cells = ["<td class='l'>macro average</td>"] + (["<td></td>"] if who == MODEL else [])
        for key, _, digits in TASK_COLUMNS:
            has = f"{key}_tasks" in macro
            cells.append(f"<td>{_num(macro.get(key), digits)}</td>" if has else "<td></td>")
        body.append("<tr class='macro'>" + "".join(cells) + "</tr>")
    return f"<table class='t'>{head}{''.join(body)}</table>"


def _metric_cell(m: dict, key: str, digits: int) -> str:
    v = m.get(key)
    why = (m.get("undefined") or {}).get(key)
    if v is None:  # the reason is in the cell's tooltip and in the Notes section
        return f"<td class='na' title='{_e(why or '')}'>—</td>"
    text = f"{v:,}" if digits == 0 else _num(v, digits)
    ci = m.get(f"{key}_ci")
    if key in ("roc_auc", "pr_auc") and ci:
        lo, hi = ci
        text += _sub(f"[{_num(lo, 3)}, {_num(hi, 3)}]" if lo is not None else "no CI")
    if key == "threshold":
        text += _sub(SOURCE_SHORT.get(m.get("threshold_source"), m.get("threshold_source", "")))
    return f"<td>{text}</td>"


def _delta_table(metrics: dict) -> str:
    """Per task: champion → challenger for each gated metric, with the paired Δ and its CI."""
    head = "<tr><th class='l'>Task</th><th>Verdict</th>"
    head += "".join(f"<th>{label}</th>" for _, label, _ in DELTA_COLUMNS) + "</tr>"
    body = []
    for task, e in metrics["tasks"].items():
        cells = [f"<td class='l'><b>{_e(task)}</b></td><td>{_tag(e['verdict']['verdict'])}</td>"]
        if not e.get("delta"):
            cells.append(
                f"<td class='l na' colspan='{len(DELTA_COLUMNS)}'>no champion for this task: "
                "judged on absolute bars</td>"
            )
        else:
            for key, _, higher in DELTA_COLUMNS:
                a, b = e[BASELINE].get(key), e[MODEL].get(key)
                cells.append(_delta_cell(e["delta"][key], higher, f"{_num(a, 4)} → {_num(b, 4)}"))
        body.append("<tr>" + "".join(cells) + "</tr>")
    md = metrics["macro"].get("delta")
    if md:
        verdict = _tag("fail" if metrics["gate_failed"] else "pass")
        cells = [f"<td class='l'>macro average</td><td>{verdict}</td>"]
        for key, _, higher in DELTA_COLUMNS:  # means over the tasks both models have
            a, b = md[key].get("baseline"), md[key].get("model")
            cells.append(_delta_cell(md[key], higher, f"{_num(a, 4)} → {_num(b, 4)}"))
        body.append("<tr class='macro'>" + "".join(cells) + "</tr>")
    return f"<table class='t'>{head}{''.join(body)}</table>"


def _delta_cell(d: dict, higher_is_better: bool, top: str = "") -> str:
    """`top` (champion → challenger) over the coloured Δ and its CI."""
    v = d.get("delta")
    first = f"{top}<br>" if top else ""
    if v is None:
        return f"<td class='na'>{first}—</td>"
    lo, hi = (d.get("ci") or [None, None])[:2]
    good = v > 0 if higher_is_better else v < 0
    cls = "" if abs(v) < 5e-5 else ("good" if good else "bad")  # ±0.0000 is no change
    if lo is not None and hi is not None and (lo > 5e-5 or hi < -5e-5):
        cls += " sig"  # the CI excludes 0 (beyond the 4 decimals shown)
    ci = (
        f" <span class='ci'>[{_num(lo, 4, True)}, {_num(hi, 4, True)}]</span>"
        if lo is not None
        else ""
    )
    return f"<td>{first}<span class='{cls}'>Δ {_num(v, 4, signed=True)}</span>{ci}</td>"


def _verdicts(metrics: dict) -> str:
    """One row per task: the verdict, how it was judged, and every gate with ✓ / ✗."""
    rows = []
    for task, e in metrics["tasks"].items():
        v = e["verdict"]
        mode = "vs champion" if v["mode"] == "relative" else "absolute bars<br>(no champion)"
        items = "".join(
            f"<li class='{'ok' if c['passed'] else 'ko'}'>{_e(c['message'])}</li>"
            for c in v["checks"]
        )
        rows.append(
            f"<tr><td class='l'><b>{_e(task)}</b></td><td>{_tag(v['verdict'])}</td>"
            f"<td class='l note'>{mode}</td>"
            f"<td class='reason'><ul class='checks'>{items or '<li>no gate configured</li>'}</ul></td></tr>"
        )
    head = "<tr><th class='l'>Task</th><th>Verdict</th><th class='l'>Judged</th><th class='l'>Gates</th></tr>"
    gates = metrics.get("config", {}).get("gates", {})
    conf = ", ".join(f"{k}={'off' if v is None else v}" for k, v in gates.items())
    return (
        f"<table class='t'>{head}{''.join(rows)}</table>"
        f"<p class='note'>Gate settings: {_e(conf)}</p>"
    )


def _slices(metrics: dict) -> str:
    slices = metrics.get("slices") or {}
    cols = metrics.get("config", {}).get("slice_columns", [])
    if not slices or not cols:
        return "<p class='note'>No slice column configured.</p>"
    has_base = metrics.get("baseline") is not None
    min_size = metrics.get("config", {}).get("min_slice_size")
    out = [
        f"<p class='note'>Slices with fewer than {min_size} rows are listed without metrics.</p>"
    ]
    for col in cols:
        head = "<tr><th class='l'>Task</th><th class='l'>Slice</th><th>Rows</th><th>Pos. rate</th><th>ROC-AUC</th><th>PR-AUC</th><th>ECE</th>"
        if has_base:
            head += "<th>Champion ROC-AUC</th><th>Δ ROC-AUC</th><th>Δ PR-AUC</th>"
        head += "<th class='l'>Note</th></tr>"
        body = []
        for task, by_col in slices.items():
            for s in by_col.get(col, []):
                m, b = s.get(MODEL) or {}, s.get(BASELINE) or {}
                cells = [
                    f"<td class='l'>{_e(task)}</td><td class='l'>{_e(s['value'])}</td>",
                    f"<td>{s['rows']:,}</td><td>{_num(s['positive_rate'], 3)}</td>",
                    f"<td>{_num(m.get('roc_auc'), 4)}</td><td>{_num(m.get('pr_auc'), 4)}</td><td>{_num(m.get('ece'), 4)}</td>",
                ]
                if has_base:
                    cells.append(f"<td>{_num(b.get('roc_auc'), 4)}</td>")
                    for k in ("delta_roc_auc", "delta_pr_auc"):
                        cells.append(_delta_cell({"delta": s.get(k)}, True))
                cells.append(f"<td class='l note'>{_e(s.get('note') or '')}</td>")
                body.append("<tr>" + "".join(cells) + "</tr>")
        out.append(f"<h3>By {_e(col)}</h3><table class='t'>{head}{''.join(body)}</table>")
    return "".join(out)


def _notes(metrics: dict) -> str:
    items = []
    # Undefined metrics, grouped: one line per (metric, reason) listing the tasks it hit.
    groups: dict[tuple[str, str], list[str]] = {}
    for task, e in metrics["tasks"].items():
        for who in (MODEL, BASELINE):
            for k, why in ((e.get(who) or {}).get("undefined") or {}).items():
                label = f"{task} ({NAMES[who]})" if metrics.get("baseline") else task
                groups.setdefault((k, why), []).append(label)
    for (k, why), where in groups.items():
        items.append(f"{_e(k)} undefined (—) for {_e(', '.join(where))}: {_e(why)}")
    for task, why in (metrics["data"].get("skipped_tasks") or {}).items():
        items.append(f"task {_e(task)} skipped: {_e(why)}")
    if metrics["data"].get("rows_quarantined"):
        items.append(
            "quarantined rows (with their reason) are in quarantine.parquet next to this report"
        )
    mc = metrics.get("config", {}).get("metrics", {})
    items.append(
        f"ECE over {mc.get('n_bins')} equal-width bins; CIs: {mc.get('n_boot')} bootstrap resamples "
        "over queries (query_id, else the query text); NDCG per query over graded queries with "
        "at least two candidates of different grades."
    )
    items.append(
        "Thresholds (Thr.): given → model (its metadata) → dev (best F1 on dev data) → eval* "
        "(best F1 on these very rows: optimistic, precision/recall/F1 then flatter the model)."
    )
    return "<ul>" + "".join(f"<li class='note'>{i}</li>" for i in items) + "</ul>"


# ---------------------------------------------------------------------------- plots


def _curves(metrics: dict, preds: pd.DataFrame) -> str:
    out = []
    for task in metrics["tasks"]:
        df = preds[preds["task"] == task]
        scores = {MODEL: df["score"].to_numpy(np.float64)}
        if "baseline_score" in df and df["baseline_score"].notna().all():
            scores[BASELINE] = df["baseline_score"].to_numpy(np.float64)
        n_bins = metrics.get("config", {}).get("metrics", {}).get("n_bins", 10)
        png = _task_figure(
            task, df["label"].to_numpy(np.int64), scores, metrics["tasks"][task], n_bins
        )
        out.append(f"<h3>{_e(task)}</h3>{_img(png, f'ROC, PR and reliability curves of {task}')}")
    return "".join(out)


def _task_figure(task: str, y: np.ndarray, scores: dict, entry: dict, n_bins: int) -> bytes:
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, axes = _figure(1, 3, (15, 4.4), left=0.6, right=0.6, wspace=0.32)
    ax_roc, ax_pr, ax_rel = axes
    both = 0 < y.sum() < len(y)
    ax_roc.plot([0, 1], [0, 1], ls="--", c="#bbb", lw=1)
    ax_pr.axhline(
        y.mean() if len(y) else 0, ls="--", c="#bbb", lw=1, label=f"positive rate {y.mean():.3f}"
    )
    ax_rel.plot([0, 1], [0, 1], ls="--", c="#bbb", lw=1, label="perfect calibration")
    hist = ax_rel.twinx()  # the score histogram, kept to the lower third of the panel
    top = 1.0
    for who, p in scores.items():
        m = entry.get(who) or {}
        c, name = COLORS[who], NAMES[who]
        if both:
            fpr, tpr, _ = roc_curve(y, p)
            ax_roc.plot(fpr, tpr, c=c, lw=1.8, label=f"{name}  AUC {_num(m.get('roc_auc'), 4)}")
            prec, rec, _ = precision_recall_curve(y, p)
            ax_pr.step(
                rec, prec, where="post", c=c, lw=1.8, label=f"{name}  AP {_num(m.get('pr_auc'), 4)}"
            )
        bins = calibration_bins(y, p, n_bins)
        full = bins["weight"] > 0
        ax_rel.plot(
            bins["mean_pred"][full],
            bins["frac_pos"][full],
            "o-",
            c=c,
            lw=1.6,
            ms=4,
            label=f"{name}  ECE {_num(m.get('ece'), 4)}",
        )
        centers = (bins["edges"][:-1] + bins["edges"][1:]) / 2
        off = -0.02 if who == MODEL else 0.02
        hist.bar(centers + off, bins["weight"], width=0.04, color=c, alpha=0.15)
        top = max(top, float(bins["weight"].max()))
    if not both:
        for ax in (ax_roc, ax_pr):
            ax.text(
                0.5, 0.5, "undefined: one class only", ha="center", va="center", color="#a50e0e"
            )
    hist.set_ylim(0, top * 3)
    hist.set_ylabel("rows per bin (bars)", color="#888", fontsize=9)
    hist.tick_params(axis="y", labelsize=8, colors="#888")
    ax_rel.set_zorder(hist.get_zorder() + 1)
    ax_rel.patch.set_visible(False)
    for ax, title, xl, yl in (
        (ax_roc, "ROC", "false positive rate", "true positive rate"),
        (ax_pr, "Precision–recall", "recall", "precision"),
        (ax_rel, "Reliability", "mean predicted probability", "observed positive rate"),
    ):
        ax.set_title(f"{task}: {title}", fontsize=11)
        ax.set_xlabel(xl, fontsize=9)
        ax.set_ylabel(yl, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.25)
        ax.legend(
            loc="lower right" if ax is not ax_rel else "upper left", fontsize=8.5, framealpha=0.9
        )
    return _png(fig)


def _diagnostics(diag: dict | None) -> str:
    if not diag:
        return (
            "<p class='note'>Not available: the challenger is not a multi-task MTL-LoRA checkpoint "
            "(exported per-task models are merged: the mixing weights and Λ_t are folded in).</p>"
        )
    tasks = diag["tasks"]
    intro = (
        f"<p class='note'>Variant {_e(diag['variant'])}: r={diag['r']}, n={diag['n_up']} shared "
        f"up-projections B<sub>i</sub>, τ={diag['tau']}, Λ {_e(diag['lambda_type'])}. Heatmaps: "
        "each task's mixing weights softmax(w<sub>t</sub>/τ) over the B<sub>i</sub>, per adapted "
        "layer (rows: tasks, columns: B<sub>i</sub>; uniform = 1/n, tasks that share a pattern "
        "share up-projections). Right: cosine similarity of the tasks' Λ<sub>t</sub>, averaged over "
        "layers, raw and after removing the shared init (how the tasks' learned changes agree).</p>"
    )
    parts = [intro]
    mix = [layer for layer in diag["layers"] if layer.get("mixing") is not None]
    if mix:
        parts.append(_img(_mixing_figure(mix, tasks, diag["n_up"]), "mixing weights per layer"))
    if diag.get("lambda_cos_mean") is not None:
        parts.append(_img(_lambda_figure(diag, tasks), "Lambda similarity across tasks"))
    return "".join(parts)


def _layer_key(name: str) -> tuple[int, str]:
    m = re.search(r"layer\.(\d+)\.(.+)$", name)
    if not m:
        return 0, name
    short = {
        "attention.self.query": "q",
        "attention.self.key": "k",
        "attention.self.value": "v",
        "attention.output.dense": "attn out",
        "intermediate.dense": "ffn in",
        "output.dense": "ffn out",
    }
    return int(m.group(1)), short.get(m.group(2), m.group(2))


def _mixing_figure(layers: list[dict], tasks: list[str], n_up: int) -> bytes:
    keyed = [(_layer_key(e["name"]), e) for e in layers]
    rows = sorted({k[0] for k, _ in keyed})
    cols = list(dict.fromkeys(k[1] for k, _ in sorted(keyed, key=lambda x: x[0][0])))
    T = len(tasks)
    cell_h = 0.32 * T + 0.9
    size = (2.1 * len(cols) + 2.4, cell_h * len(rows) + 0.9)
    fig, axes = _figure(
        len(rows),
        len(cols),
        size,
        squeeze=False,
        left=1.0,
        right=1.4,
        top=0.75,
        bottom=0.35,
        wspace=0.15,
        hspace=0.55,
    )
    annotate = T * n_up <= 48
    im = None
    for (li, col), e in keyed:
        ax = axes[rows.index(li)][cols.index(col)]
        mix = np.asarray(e["mixing"], dtype=float)  # (T, n)
        im = ax.imshow(mix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        if annotate:
            for t in range(mix.shape[0]):
                for i in range(mix.shape[1]):
                    ax.text(
                        i,
                        t,
                        f"{mix[t, i]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if mix[t, i] < 0.6 else "black",
                    )
        ax.set_title(f"layer {li} · {col}", fontsize=9)
        ax.set_xticks(range(mix.shape[1]), [f"B{i + 1}" for i in range(mix.shape[1])], fontsize=7)
        is_first = cols.index(col) == 0
        ax.set_yticks(range(T), tasks if is_first else [""] * T, fontsize=7)
    for r in range(len(rows)):
        for c in range(len(cols)):
            if not axes[r][c].images:
                axes[r][c].axis("off")
    if im is not None:
        fig.colorbar(im, ax=[a for row in axes for a in row], shrink=0.6, label="softmax(w_t/τ)")
    fig.suptitle("Mixing weights of each task over the shared up-projections B_i", fontsize=12)
    return _png(fig)


def _lambda_figure(diag: dict, tasks: list[str]) -> bytes:
    T = len(tasks)
    size = max(4.2, 0.55 * T + 2.4)
    fig, axes = _figure(
        1, 2, (2 * size + 2, size), left=1.1, right=0.2, bottom=1.0, top=0.4, wspace=0.35
    )
    for ax, key, title in (
        (axes[0], "lambda_cos_mean", "cos(Λ_s, Λ_t), mean over layers"),
        (axes[1], "lambda_dev_mean", "cos(Λ_s − init, Λ_t − init), mean over layers"),
    ):
        mat = np.asarray(diag[key], dtype=float)
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        for s in range(T):
            for t in range(T):
                ax.text(
                    t,
                    s,
                    f"{mat[s, t]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if abs(mat[s, t]) > 0.6 else "black",
                )
        ax.set_xticks(range(T), tasks, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(T), tasks, fontsize=8)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def _figure(nrows: int, ncols: int, size: tuple[float, float], squeeze: bool = True, **adjust):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display).

    Margins are fixed, in inches (`adjust`, see `_margins`), rather than computed by a layout
    engine: an engine re-draws each figure to measure it, doubling the cost of a report.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze)
    fig.subplots_adjust(**_margins(size, **adjust))
    return fig, axes


def _margins(size, left=0.6, right=0.3, bottom=0.55, top=0.45, wspace=0.3, hspace=0.3) -> dict:
    """Figure margins given in inches, as the fractions subplots_adjust wants."""
    w, h = size
    return {
        "left": left / w,
        "right": 1 - right / w,
        "bottom": bottom / h,
        "top": 1 - top / h,
        "wspace": wspace,
        "hspace": hspace,
    }


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


# ---------------------------------------------------------------------------- formatting


def _num(v, digits: int = 4, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if digits == 0:
        return f"{int(v):,}"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _sub(text: str) -> str:
    """A small grey second line in a table cell (CIs, sources, reasons)."""
    return f"<br><span class='ci'>{_e(text)}</span>" if text else ""


def _tag(verdict: str) -> str:
    cls = "pass" if verdict == "pass" else "fail"
    return f"<span class='tag {cls}'>{verdict.upper()}</span>"


def _e(x) -> str:
    return html.escape(str(x), quote=True)
