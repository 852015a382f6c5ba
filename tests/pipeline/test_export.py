"""Merged per-task ONNX export: parity gate on a tiny model, a broken merge caught, int8 + AUC."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from features.tokenize import PairTokenizer
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ConfigError
from pipeline.export import (
    IO_SPEC,
    ExportConfig,
    ParityError,
    QuantizationError,
    export_checkpoint,
    parity_shapes,
)
from tests.models.helpers import tiny_model

TASKS = ("a", "b", "c")
MAX_LEN = 64
TASK_FILES = {
    "model.onnx",
    "meta.json",
    "parity.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
}


# ---------------------------------------------------------------------------------------------
# Helpers (also used by the scorer, registry and CLI tests)


def make_checkpoint(encoder_dir, out: Path, seed: int = 0) -> Path:
    """A tiny 3-task checkpoint with non-zero B, Λ, w and heads (merge must matter)."""
    model = tiny_model(encoder_dir, TASKS, seed=seed)
    return save_checkpoint(
        model,
        out,
        max_length=MAX_LEN,
        extra={"thresholds": {"a": 0.4}, "metrics": {"a": {"auc": 0.81}, "b/auc": 0.7}},
    )


def export_tiny(encoder_dir, root: Path, **cfg) -> tuple[Path, Path]:
    ckpt = make_checkpoint(encoder_dir, root / "ckpt")
    out = root / "export"
    export_checkpoint(ckpt, out, ExportConfig(source=str(ckpt), **cfg))
    return ckpt, out


def shared_export(encoder_dir, tmp_path_factory) -> tuple[Path, Path]:
    """One tiny export per test session (read-only for tests), shared across test files."""
    import shutil

    root = tmp_path_factory.getbasetemp() / "adrel-shared-export"
    if not (root / "export" / "index.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        export_tiny(encoder_dir, root)
    return root / "ckpt", root / "export"


WORDS_Q = ["red", "running", "shoes", "cheap", "flights", "paris", "tv", "55 inch", "dog food"]
WORDS_AD = ["Nike", "Air", "Sale", "Book", "now", "UHD", "Smart", "grain free", "salmon", "mesh"]


def text_rows(n: int, seed: int = 0) -> dict[str, list]:
    """Query/ad rows of varied length built from a small vocabulary."""
    rng = np.random.default_rng(seed)
    pick = lambda words, k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return {
        "query": [pick(WORDS_Q, int(rng.integers(1, 5))) for _ in range(n)],
        "ad_title": [pick(WORDS_AD, int(rng.integers(2, 7))) for _ in range(n)],
        "ad_description": [
            None if i % 4 == 0 else pick(WORDS_AD, int(rng.integers(3, 30))) for i in range(n)
        ],
    }


def torch_logits(ckpt: Path, task: str, rows: dict) -> np.ndarray:
    """The unmerged multi-task model's logits for `rows` (the reference of every variant)."""
    model, cfg = load_checkpoint(ckpt)
    enc = PairTokenizer(ckpt, cfg["max_length"]).encode(
        rows["query"], rows["ad_title"], rows.get("ad_description")
    )
    t = {k: torch.from_numpy(v) for k, v in enc.items()}
    ids = torch.full((len(rows["query"]),), model.tasks.id(task), dtype=torch.long)
    with torch.no_grad():
        return model(t["input_ids"], t["attention_mask"], ids, t["token_type_ids"]).numpy()


def write_validation(root: Path, task: str, rows: dict, labels: np.ndarray) -> Path:
    d = root / f"task={task}"
    d.mkdir(parents=True, exist_ok=True)
    table = pa.table({**rows, "label": pa.array(labels.astype(np.int8))})
    pq.write_table(table, d / "part-0.parquet")
    return root


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_encoder_dir, tmp_path_factory):
    return shared_export(tiny_encoder_dir, tmp_path_factory)


def test_export_three_tasks_passes_parity(exported):
    ckpt, out = exported
    index = json.loads((out / "index.json").read_text())
    assert index["tasks"] == list(TASKS)
    assert index["source_model"] == str(ckpt)
    expected_shapes = {(b, s) for b in (1, 3, 8) for s in (8, 33, MAX_LEN)}
    for task in TASKS:
        d = out / task
        assert {p.name for p in d.iterdir()} == TASK_FILES
        parity = json.loads((d / "parity.json").read_text())
        fp32 = parity["variants"]["fp32"]
        assert fp32["pass"] and fp32["max_abs_diff"] <= IO_SPEC.atol
        shapes = {(s["batch"], s["seq"]) for s in fp32["shapes"]}
        assert shapes == expected_shapes and IO_SPEC.dummy_shape not in shapes
        assert all(s["pass"] and s["max_abs_diff"] <= 1e-4 for s in fp32["shapes"])
        meta = json.loads((d / "meta.json").read_text())
        assert meta["task"] == task and meta["max_length"] == MAX_LEN
        assert meta["pooling"] == "mean" and meta["serving_variant"] == "fp32"
        assert meta["fused_ops"].get("Attention") == 2  # both layers fused
        # SkipLayerNormalization is written back as Add + LayerNormalization (faster on CPU)
        assert "SkipLayerNormalization" not in meta["fused_ops"]
        ops = Counter(n.op_type for n in onnx.load(str(d / "model.onnx")).graph.node)
        assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 4
        assert {"torch", "onnxruntime", "onnx", "transformers"} <= set(meta["versions"])
    meta_a = json.loads((out / "a" / "meta.json").read_text())
    assert meta_a["threshold"] == 0.4 and meta_a["metrics"] == {"auc": 0.81}
    assert json.loads((out / "b" / "meta.json").read_text())["metrics"] == {"auc": 0.7}
    assert json.loads((out / "c" / "meta.json").read_text())["threshold"] is None


def test_onnx_io_spec_is_the_declared_one(exported):
    import onnx

    m = onnx.load(str(exported[1] / "a" / "model.onnx"))
    inputs = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert inputs == {n: ["batch", "sequence"] for n in IO_SPEC.inputs}
    (out,) = m.graph.output
    assert out.name == "logits" and [d.dim_param for d in out.type.tensor_type.shape.dim] == [
        "batch"
    ]


def test_exported_models_reproduce_unmerged_model_on_unseen_shapes(exported):
    """Independent of the gate: new rows, a batch of 5, each task its own adapter."""
    from pipeline.export import ort_session, run_session

    ckpt, out = exported
    rows = text_rows(5, seed=3)
    enc = PairTokenizer(ckpt, MAX_LEN).encode(
        rows["query"], rows["ad_title"], rows["ad_description"]
    )
    per_task = {}
    for task in TASKS:
        got = run_session(ort_session(out / task / "model.onnx"), enc)
        np.testing.assert_allclose(got, torch_logits(ckpt, task, rows), atol=1e-4, rtol=0)
        per_task[task] = got
    assert np.abs(per_task["a"] - per_task["b"]).max() > 1e-2  # tasks really differ


def _drop_one_layer(model, task):
    """A merge that forgot ΔW_t of one layer: a plausible bug the gate must catch."""
    from models.merge import merge_task

    merged = merge_task(model, task)
    layer = model.adapter_layers()["encoder.layer.1.attention.self.value"]
    with torch.no_grad():
        merged.encoder.encoder.layer[1].attention.self.value.weight.copy_(layer.base.weight)
    return merged


def test_corrupted_merge_is_caught_and_nothing_published(tiny_encoder_dir, tmp_path):
    ckpt = make_checkpoint(tiny_encoder_dir, tmp_path / "ckpt")
    out = tmp_path / "export"
    with pytest.raises(ParityError) as e:
        export_checkpoint(ckpt, out, ExportConfig(tasks=["b"]), merge_fn=_drop_one_layer)
    msg = str(e.value)
    assert "'b'" in msg and "batch=" in msg and "seq=" in msg
    assert e.value.task == "b" and e.value.failures
    assert all(f["max_abs_diff"] > 1e-4 for f in e.value.failures)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left


def test_failed_reexport_keeps_the_previous_export(exported, tmp_path):
    import shutil

    ckpt, published = exported
    out = tmp_path / "export"
    shutil.copytree(published, out)
    before = (out / "index.json").read_text()
    with pytest.raises(ParityError):
        export_checkpoint(ckpt, out, ExportConfig(tasks=["a"]), merge_fn=_drop_one_layer)
    assert (out / "index.json").read_text() == before
    assert {p.name for p in out.iterdir()} == {"index.json", *TASKS}


def test_refuses_to_overwrite_a_foreign_directory(exported, tmp_path):
    from pipeline.export import OutputError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not an adrel export"):
        export_checkpoint(exported[0], out, ExportConfig(tasks=["a"]))
    assert (out / "notes.txt").read_text() == "keep me"


def test_int8_reports_auc_and_the_guard_refuses(exported, tmp_path):
    """Labels are cut from the fp32 logits between a pair int8 orders the other way, so
    fp32 AUC is 1 and int8 AUC is provably below it: the guard must see the drop."""
    from pipeline.export import (
        DEFAULT_INT8_RECIPE,
        ort_session,
        quantize_int8,
        validation_logits,
    )
    from serving.scorer import Scorer

    ckpt, fp32_export = exported
    rows = text_rows(400, seed=1)
    fp32 = Scorer(fp32_export / "a", providers="cpu").logits(
        rows["query"], rows["ad_title"], rows["ad_description"]
    )
    q_path = quantize_int8(fp32_export / "a" / "model.onnx", tmp_path / "q.onnx")
    # as the export measures it: dynamic int8 depends on the batch, so batch the same way
    q = validation_logits(ort_session(q_path), fp32_export / "a", MAX_LEN, rows)
    hi, lo = np.nonzero((fp32[:, None] > fp32[None, :]) & (q[:, None] < q[None, :]))
    assert len(hi), "int8 kept the exact ranking of 400 rows"
    taus = (fp32[hi] + fp32[lo]) / 2  # any of these cuts puts a discordant pair across it
    margin = np.abs(fp32[None, :] - taus[:, None]).min(1)  # keep clear of float noise
    tau = taus[int(np.argmax(margin))]
    labels = (fp32 > tau).astype(np.int64)
    val = write_validation(tmp_path / "val", "a", rows, labels)

    out = tmp_path / "int8"
    cfg = ExportConfig(tasks=["a"], quantize="int8", validation=str(val), max_auc_drop=0.5)
    res = export_checkpoint(ckpt, out, cfg)
    rep = json.loads((out / "a" / "parity.json").read_text())["variants"]["int8"]
    auc = rep["auc"]
    assert res.tasks["a"].parity["variants"]["int8"]["auc"] == auc
    assert rep["recipe"] == DEFAULT_INT8_RECIPE
    assert auc["rows"] == 400 and auc["positives"] == int(labels.sum())
    assert auc["fp32"] == pytest.approx(1.0) and auc["int8"] < 1.0
    assert auc["delta"] == pytest.approx(auc["int8"] - auc["fp32"])
    assert auc["pass"] and rep["pass"] and not rep["gated"]
    assert rep["max_abs_diff"] > 0  # int8 differs from the reference; reported, not gated
    meta = json.loads((out / "a" / "meta.json").read_text())
    assert meta["serving_variant"] == "int8" and (out / "a" / "model.int8.onnx").is_file()

    # the reported AUC is the AUC of what the Scorer serves
    from sklearn.metrics import roc_auc_score

    served = Scorer(out / "a", providers="cpu")
    assert served.variant == "int8"
    int8 = served.logits(rows["query"], rows["ad_title"], rows["ad_description"])
    assert roc_auc_score(labels, int8) == pytest.approx(auc["int8"], abs=1e-9)
    np.testing.assert_allclose(
        Scorer(out / "a", providers="cpu", variant="fp32").logits(
            rows["query"], rows["ad_title"], rows["ad_description"]
        ),
        fp32,
        atol=1e-6,
    )

    drop = auc["fp32"] - auc["int8"]
    refused = tmp_path / "refused"
    strict = ExportConfig(tasks=["a"], quantize="int8", validation=str(val), max_auc_drop=drop / 2)
    with pytest.raises(QuantizationError, match=r"task 'a'.*ROC-AUC"):
        export_checkpoint(ckpt, refused, strict)
    assert not refused.exists()


def test_config_errors_are_listed_together(tmp_path):
    with pytest.raises(ConfigError) as e:
        ExportConfig(tasks=[], quantize="int4", max_auc_drop=2.0, atol=0)
    text = str(e.value)
    for field in ("tasks", "quantize", "max_auc_drop", "atol"):
        assert field in text
    with pytest.raises(ConfigError, match="validation"):
        ExportConfig(quantize="int8")
    with pytest.raises(ConfigError, match="does not exist"):
        ExportConfig(validation=str(tmp_path / "nope"))


def test_unknown_task_is_refused(exported, tmp_path):
    with pytest.raises(ConfigError, match="unknown task"):
        export_checkpoint(exported[0], tmp_path / "x", ExportConfig(tasks=["a", "zzz"]))


def test_parity_shapes_cover_the_grid():
    assert parity_shapes(128) == [(b, s) for b in (1, 3, 8) for s in (8, 33, 96, 128)]
    assert parity_shapes(40) == [(b, s) for b in (1, 3, 8) for s in (8, 33, 40)]


def unfuse_skip_layer_norm(path: Path) -> int:
    """serving.scorer.plain_layer_norms on a graph file, in place (as the export does before
    it saves), through the Scorer's own in-memory rewrite; how many were rewritten."""
    from serving.scorer import _plain_graph

    graph, count = _plain_graph(path)
    if count:
        path.write_bytes(graph)
    return count


def skip_layer_norm_graph(path: Path, with_bias: bool, hidden: int = 8) -> Path:
    """y = LayerNorm(x + skip [+ bias]) as one com.microsoft SkipLayerNormalization, then a
    MatMul (the unfused nodes must feed on the same name), non-trivial weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "gamma": rng.normal(1, 0.3, hidden),
        "beta": rng.normal(0, 0.3, hidden),
        "bias": rng.normal(0, 0.5, hidden),
        "w": rng.normal(0, 1, (hidden, 3)),
    }
    inputs = ["x", "skip", "gamma", "beta"] + (["bias"] if with_bias else [])
    nodes = [
        helper.make_node(
            "SkipLayerNormalization", inputs, ["y"], domain="com.microsoft", epsilon=1e-5
        ),
        helper.make_node("MatMul", ["y", "w"], ["out"]),
    ]
    dims = ["batch", "seq", hidden]
    graph = helper.make_graph(
        nodes,
        "skip_ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("x", "skip")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))
    return path


@pytest.mark.parametrize("with_bias", [True, False])
def test_skip_layer_norm_is_written_back_as_plain_ops_with_the_same_outputs(tmp_path, with_bias):
    import onnxruntime as ort

    fused = skip_layer_norm_graph(tmp_path / "fused.onnx", with_bias)
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(fused.read_bytes())
    assert unfuse_skip_layer_norm(plain) == 1
    ops = Counter(n.op_type for n in onnx.load(str(plain)).graph.node)
    assert ops == {"Add": 1 + with_bias, "LayerNormalization": 1, "MatMul": 1}
    assert unfuse_skip_layer_norm(plain) == 0  # nothing left to rewrite
    rng = np.random.default_rng(1)
    feed = {n: rng.normal(0, 2, (3, 5, 8)).astype(np.float32) for n in ("x", "skip")}
    cpu = ["CPUExecutionProvider"]
    want = ort.InferenceSession(str(fused), providers=cpu).run(None, feed)[0]
    got = ort.InferenceSession(str(plain), providers=cpu).run(None, feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
