"""The runtime Scorer: no torch/transformers, same scores as the export's reference, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from features.tokenize import PairTokenizer
from serving.scorer import (
    CPU,
    Scorer,
    ScorerError,
    choose_providers,
    cuda_usable,
    length_groups,
    load_scorers,
    make_session,
)
from tests.pipeline.test_export import (
    MAX_LEN,
    TASKS,
    shared_export,
    skip_layer_norm_graph,
    text_rows,
    torch_logits,
    unfuse_skip_layer_norm,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tiny_encoder_dir, tmp_path_factory):
    return shared_export(tiny_encoder_dir, tmp_path_factory)


def test_scorer_imports_neither_torch_nor_transformers(exported):
    """A fresh interpreter loads every task, scores, and never imports torch/transformers."""
    ckpt, out = exported
    rows = text_rows(6, seed=5)
    code = f"""
import json, sys
from serving.scorer import load_scorers
rows = json.loads({json.dumps(json.dumps(rows))})
scorers = load_scorers({str(out)!r})
res = {{t: s.score(rows["query"], rows["ad_title"], rows["ad_description"]).tolist()
       for t, s in scorers.items()}}
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({{"scores": res, "bad": bad, "providers": scorers["a"].providers}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["bad"] == []
    assert sorted(res["scores"]) == list(TASKS)
    if not cuda_usable():
        assert res["providers"] == [CPU]
        assert "CUDA" not in proc.stderr  # no provider-fallback error spam
    for task in TASKS:
        ref = 1 / (1 + np.exp(-torch_logits(ckpt, task, rows).astype(np.float64)))
        np.testing.assert_allclose(res["scores"][task], ref, atol=1e-5)


def test_scores_match_the_unmerged_model_in_any_batching(exported):
    ckpt, out = exported
    rows = text_rows(37, seed=7)
    ref = torch_logits(ckpt, "b", rows)
    # One call per row, calls split by length, one call per batch_size rows.
    for batch_size, cost in [(1, 16.0), (8, 0.0), (8, 16.0), (64, 16.0), (64, 1e9)]:
        s = Scorer(out / "b", providers="cpu", batch_size=batch_size, call_cost_tokens=cost)
        got = s.logits(rows["query"], rows["ad_title"], rows["ad_description"])
        assert got.dtype == np.float32 and got.shape == (37,)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    probs = s.score(rows["query"], rows["ad_title"], rows["ad_description"])
    assert probs.dtype == np.float32 and ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-got.astype(np.float64))), atol=1e-6)


def _split_cost(lengths, groups, call_cost):
    return sum(call_cost + (hi - lo) * lengths[hi - 1] for lo, hi in groups)


def test_length_groups_is_the_cheapest_split():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        lengths = np.sort(rng.integers(1, 60, n))
        max_rows = int(rng.integers(1, 6))
        cost = float(rng.choice([0.0, 5.0, 16.0, 100.0]))
        groups = length_groups(lengths, max_rows, cost)
        # The groups cover every row once, in order, none longer than max_rows.
        assert groups[0][0] == 0 and groups[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        assert all(0 < hi - lo <= max_rows for lo, hi in groups)
        # No other contiguous split is cheaper (all 2^(n-1) of them, checked by brute force).
        best = min(
            _split_cost(lengths, split, cost)
            for mask in range(2 ** (n - 1))
            for split in [_cuts(n, mask)]
            if all(hi - lo <= max_rows for lo, hi in split)
        )
        assert _split_cost(lengths, groups, cost) == pytest.approx(best)
    # Short and long rows apart when padding costs more than a call; together when not.
    assert length_groups(np.array([5, 6, 7, 60, 62]), 64, 16.0) == [(0, 3), (3, 5)]
    assert length_groups(np.array([5, 6, 7, 60, 62]), 64, 1e9) == [(0, 5)]
    assert length_groups(np.array([20, 20, 20, 20]), 3, 16.0) in (
        [(0, 3), (3, 4)],
        [(0, 1), (1, 4)],
    )
    assert length_groups(np.array([], dtype=np.int64), 8, 16.0) == []


def _cuts(n, mask):
    bounds = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
    return list(zip(bounds, bounds[1:]))


def test_score_tokens_on_pretokenised_fixed_width_batches(exported):
    """Batch scoring hands in fixed-width (pad_to_max) token arrays: same logits."""
    _, out = exported
    s = Scorer(out / "c", providers="cpu")
    rows = text_rows(9, seed=2)
    fixed = PairTokenizer(out / "c", MAX_LEN, pad_to_max=True).encode(
        rows["query"], rows["ad_title"], rows["ad_description"]
    )
    assert fixed["input_ids"].shape == (9, MAX_LEN)
    got = s.score_tokens(**fixed)
    want = s.logits(rows["query"], rows["ad_title"], rows["ad_description"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    tok = s.tokenizer({k: np.asarray(v, dtype=object) for k, v in rows.items()})
    np.testing.assert_allclose(s.score_tokens(tok["input_ids"], tok["attention_mask"],
                                              tok["token_type_ids"]), want, atol=1e-5)  # fmt: skip
    assert s.score_tokens(np.zeros((0, 4), np.int64), np.zeros((0, 4), np.int64)).shape == (0,)


def test_attributes_and_threads(exported):
    _, out = exported
    s = Scorer(out / "a", providers="cpu", intra_op_threads=1, inter_op_threads=1)
    assert s.task == "a" and s.max_length == MAX_LEN and s.threshold == 0.4
    assert s.meta["task"] == "a" and s.model_version == s.meta["model_version"]
    assert s.session.get_session_options().intra_op_num_threads == 1
    assert s.providers == [CPU]
    assert s.logits([], [], []).shape == (0,)
    assert (
        Scorer(out / "a", providers="cpu", model_version="adrel-a/7").model_version == "adrel-a/7"
    )
    spin = "session.intra_op.allow_spinning"
    quiet = Scorer(out / "a", providers="cpu", spin_wait=False)
    assert quiet.session.get_session_options().get_session_config_entry(spin) == "0"
    assert np.allclose(
        quiet.logits(["red shoes"], ["red shoes"]), s.logits(["red shoes"], ["red shoes"])
    )


def test_a_solo_session_scores_the_same_with_more_threads(exported):
    """solo_threads builds a second session (for calls that run alone) with those threads;
    solo=True scores on it, the same scores as the main session. Without it, solo=True
    scores on the one session."""
    _, out = exported
    rows = text_rows(9, seed=4)
    two = Scorer(out / "a", providers="cpu", intra_op_threads=1, solo_threads=2)
    assert two.session.get_session_options().intra_op_num_threads == 1
    assert two.solo_session.get_session_options().intra_op_num_threads == 2
    args = (rows["query"], rows["ad_title"], rows["ad_description"])
    main, solo = two.logits(*args), two.logits(*args, solo=True)
    np.testing.assert_allclose(solo, main, atol=1e-6)
    np.testing.assert_allclose(two.score(*args, solo=True), two.score(*args), atol=1e-7)
    one = Scorer(out / "a", providers="cpu", intra_op_threads=1)
    assert one.solo_session is None
    np.testing.assert_allclose(one.logits(*args, solo=True), main, atol=1e-6)


def test_a_cpu_session_keeps_layer_norms_unfused(exported, tmp_path):
    """ORT would fold Add + LayerNormalization back into SkipLayerNormalization (its slow CPU
    kernel); a CPU session leaves the exported graph's plain ops as they are."""
    import onnx
    import onnxruntime as ort

    def ops_run(path: Path) -> dict[str, int]:
        return Counter(n.op_type for n in onnx.load(str(path)).graph.node)

    plain = skip_layer_norm_graph(tmp_path / "plain.onnx", with_bias=True)
    unfuse_skip_layer_norm(plain)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort_default.onnx")
    ort.InferenceSession(str(plain), so, providers=[CPU])
    assert ops_run(tmp_path / "ort_default.onnx")["SkipLayerNormalization"] == 1  # ORT fuses
    make_session(plain, "cpu", optimized_model_path=tmp_path / "scorer.onnx")
    assert ops_run(tmp_path / "scorer.onnx")["SkipLayerNormalization"] == 0
    _, out = exported  # and the exported model as the Scorer runs it
    make_session(out / "a" / "model.onnx", "cpu", optimized_model_path=tmp_path / "a.onnx")
    ran = ops_run(tmp_path / "a.onnx")
    assert ran["SkipLayerNormalization"] == 0 and ran["LayerNormalization"] == 4
    assert ran["Attention"] == 2


def test_an_export_with_fused_layer_norms_is_scored_with_plain_ones(exported, tmp_path):
    """An export written before pipeline.export wrote plain LayerNorms (its graph holds
    SkipLayerNormalization, its meta says so) is rewritten in memory at load: the same
    scores, the faster ops."""
    import shutil

    import onnx
    import onnxruntime as ort

    _, out = exported
    old = tmp_path / "a"
    shutil.copytree(out / "a", old)
    so = ort.SessionOptions()  # ORT's own rewrites fuse the plain ops back, as exports did
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(old / "model.onnx")
    ort.InferenceSession(str(out / "a" / "model.onnx"), so, providers=[CPU])
    ops = Counter(n.op_type for n in onnx.load(str(old / "model.onnx")).graph.node)
    assert ops["SkipLayerNormalization"] == 4
    meta = json.loads((old / "meta.json").read_text())
    meta["fused_ops"]["SkipLayerNormalization"] = 4
    (old / "meta.json").write_text(json.dumps(meta))

    rows = text_rows(7, seed=5)
    args = (rows["query"], rows["ad_title"], rows["ad_description"])
    was = Scorer(old, providers="cpu", solo_threads=2)
    now = Scorer(out / "a", providers="cpu")
    assert was.rewritten_layer_norms == 4 and now.rewritten_layer_norms == 0
    np.testing.assert_allclose(was.logits(*args), now.logits(*args), atol=1e-5, rtol=0)
    np.testing.assert_allclose(was.logits(*args, solo=True), now.logits(*args), atol=1e-5)
    assert was.model_version == meta["model_version"]  # the same model, by its file hash


def test_provider_choice():
    assert choose_providers("cpu") == [CPU]
    assert choose_providers(["CPUExecutionProvider"]) == [CPU]
    auto = choose_providers("auto")
    assert auto == (["CUDAExecutionProvider", CPU] if cuda_usable() else [CPU])
    with pytest.raises(ScorerError, match="providers must be"):
        choose_providers("tpu")
    if not cuda_usable():
        with pytest.raises(ScorerError, match="no usable CUDA"):
            choose_providers("cuda")


def test_load_scorers_forms_and_errors(exported, tmp_path):
    _, out = exported
    assert sorted(load_scorers(out, providers="cpu")) == list(TASKS)
    assert list(load_scorers(out, tasks=["c"], providers="cpu")) == ["c"]
    assert list(load_scorers(out / "b", providers="cpu")) == ["b"]
    with pytest.raises(ScorerError, match=r"task\(s\) \['zzz'\].*\['a', 'b', 'c'\]"):
        load_scorers(out, tasks=["zzz"])
    with pytest.raises(ScorerError, match="no exported model"):
        load_scorers(tmp_path)
    with pytest.raises(ScorerError, match="not a directory"):
        load_scorers(tmp_path / "missing")


def test_bad_calls_name_the_problem(exported):
    _, out = exported
    s = Scorer(out / "a", providers="cpu")
    with pytest.raises(ScorerError, match="2 queries but 1 ad titles"):
        s.logits(["q1", "q2"], ["t1"])
    with pytest.raises(ScorerError, match="ad descriptions"):
        s.logits(["q1", "q2"], ["t1", "t2"], ["d1"])
    ids = np.ones((2, 5), np.int64)
    with pytest.raises(ScorerError, match="attention_mask has shape"):
        s.score_tokens(ids, np.ones((2, 4), np.int64))
    with pytest.raises(ScorerError, match="2-D"):
        s.score_tokens(np.ones(5, np.int64), np.ones(5, np.int64))
    with pytest.raises(ScorerError, match="no 'int8' model"):
        Scorer(out / "a", variant="int8")
    with pytest.raises(ScorerError, match="no meta.json"):
        Scorer(out)
    with pytest.raises(ScorerError, match="call_cost_tokens must be >= 0, got -1"):
        Scorer(out / "a", providers="cpu", call_cost_tokens=-1)
