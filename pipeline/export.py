"""Merged per-task ONNX export with a parity gate: where MTL-LoRA pays off in production.

For each task: merge ΔW_t into the frozen weights (models.merge.merge_task) → a plain encoder
of the base architecture + that task's head → ONNX (legacy TorchScript exporter, eager
attention: the graph ORT's BERT fusions recognise) → ORT transformer optimizer (fused
Attention / BiasGelu / EmbedLayerNorm; its SkipLayerNorm written back as Add + LayerNorm, the
faster form on CPU) → optionally an int8 variant guarded by a validation-set ROC-AUC bound.

Parity gate: every published variant is compared with the *unmerged* multi-task PyTorch model
on real text at shapes different from the export dummy. fp32 must agree to `atol`; int8 is
reported (its guard is the AUC drop). Everything is built in a temp folder next to the output
and renamed into place at the end: a failed gate publishes nothing.

Output:
    DIR/index.json                      tasks, source, variants
    DIR/<task>/model.onnx               fp32, fused (the parity-gated graph)
    DIR/<task>/model.int8.onnx          with --quantize int8
    DIR/<task>/tokenizer.json (+ tokenizer_config.json, vocab, special tokens)
    DIR/<task>/meta.json                task, source, versions, max_length, pooling, threshold, io
    DIR/<task>/parity.json              per variant and shape: max abs diff, pass/fail
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from features.output import replace_dir
from models.config import ConfigError

INDEX_FILE = "index.json"
META_FILE = "meta.json"
PARITY_FILE = "parity.json"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
EXPORT_FORMAT = "adrel-onnx-export"
EXPORT_FORMAT_VERSION = 1
QUANTIZE_CHOICES = ("int8",)
# Dynamic int8 recipes (int8 weights, uint8 activations quantized per call). Measured on
# MiniLM-L6 with a fitted head, 600 stsb dev rows, AVX2 CPU without VNNI (ROC-AUC change;
# mean |Δlogit| with logit std 2.0; b32s64 speedup): "dynamic" -0.0068, 0.41, 1.55x (fails the
# 0.005 guard); "per_channel" -0.0055, 0.22, 1.6x; "per_channel_matmul" -0.0010, 0.20,
# 1.4-1.6x; "per_channel_matmul_keep_ffn_out" -0.0005, 0.12, 1.0x. The error is spread over
# all layers (dynamic per-tensor activation scales), not one bad node.
INT8_RECIPES: dict[str, dict] = {
    "dynamic": {"per_channel": False, "reduce_range": False},
    "per_channel": {"per_channel": True, "reduce_range": True},
    "per_channel_matmul": {"per_channel": True, "reduce_range": True, "ops": ["MatMul"]},
    "per_channel_matmul_keep_ffn_out": {
        "per_channel": True,
        "reduce_range": True,
        "ops": ["MatMul"],
        "keep_fp32": "ffn_out",
    },
}
DEFAULT_INT8_RECIPE = "per_channel_matmul"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The I/O spec, declared once: the exporter, the parity gate, the Scorer and the registry's
# signature all read it from here.


@dataclass(frozen=True)
class OnnxIOSpec:
    """Names, dynamic axes, opset and tolerance of every exported task model."""

    inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    output: str = "logits"  # (batch,) float32, one logit per row
    batch_axis: str = "batch"
    seq_axis: str = "sequence"
    opset: int = 17
    atol: float = 1e-4  # fp32 parity bound on logits
    dummy_shape: tuple[int, int] = (2, 16)  # the export's trace input; parity avoids it

    def input_names(self, token_types: bool) -> list[str]:
        return [n for n in self.inputs if token_types or n != "token_type_ids"]

    def dynamic_axes(self, token_types: bool) -> dict[str, dict[int, str]]:
        axes = {n: {0: self.batch_axis, 1: self.seq_axis} for n in self.input_names(token_types)}
        axes[self.output] = {0: self.batch_axis}
        return axes


IO_SPEC = OnnxIOSpec()
PARITY_BATCHES = (1, 3, 8)
PARITY_SEQS = (8, 33, 96)  # plus the model's max_length


# ---------------------------------------------------------------------------------------------
# Errors


class ExportError(RuntimeError):
    """The export cannot be published (nothing was written to the output directory)."""


class OutputError(ValueError):
    """The output directory cannot take an export (checked before any work is done)."""


class ParityError(ExportError):
    """ORT and the unmerged PyTorch model disagree beyond the bound; names task, variant, shapes."""

    def __init__(self, task: str, variant: str, failures: list[dict], atol: float):
        self.task, self.variant, self.failures, self.atol = task, variant, failures, atol
        shapes = ", ".join(
            f"batch={f['batch']} seq={f['seq']}: {f['max_abs_diff']:.3g}" for f in failures
        )
        super().__init__(
            f"parity gate failed for task {task!r} ({variant}): max |ORT - PyTorch unmerged| > "
            f"{atol:g} at {shapes}"
        )


class QuantizationError(ExportError):
    """int8 lost more ROC-AUC than allowed, or its AUC cannot be measured."""


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class ExportConfig:
    """What to export and how strictly to check it.

    tasks: subset of the checkpoint's tasks (None: all).
    quantize: None or "int8" (adds model.int8.onnx, served by default when it passes).
    max_auc_drop: int8 may lose at most this much validation ROC-AUC (fp32 minus int8).
    validation: labelled rows in the contract layout (ROOT/task=<name>/*.parquet); required
        for int8 (the AUC guard has nothing to measure otherwise).
    validation_rows: cap on validation rows per task used for the AUC (first N, file order).
    int8_recipe: which int8 quantization (see INT8_RECIPES; the default passed here).
    optimize: run ORT's transformer fusions (off only for comparisons).
    atol: fp32 parity bound (IO_SPEC.atol by default).
    source: how the checkpoint was named on the command line (written to meta.json).
    source_info: registry facts about the source (name, version, run_id) for meta.json.
    """

    tasks: list[str] | None = None
    quantize: str | None = None
    max_auc_drop: float = 0.005
    validation: str | None = None
    validation_rows: int = 4000
    int8_recipe: str = DEFAULT_INT8_RECIPE
    optimize: bool = True
    atol: float = IO_SPEC.atol
    source: str | None = None
    source_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        e = []
        if self.tasks is not None:
            if not isinstance(self.tasks, list) or not all(isinstance(t, str) for t in self.tasks):
                e.append(f"tasks must be a list of task names, got {self.tasks!r}")
            elif not self.tasks:
                e.append("tasks must name at least one task (or be None for all)")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            e.append(f"quantize must be one of {QUANTIZE_CHOICES} or None, got {self.quantize!r}")
        if not _number(self.max_auc_drop) or not 0 <= self.max_auc_drop < 1:
            e.append(f"max_auc_drop must be in [0, 1), got {self.max_auc_drop!r}")
        if not isinstance(self.validation_rows, int) or self.validation_rows < 10:
            e.append(f"validation_rows must be an integer >= 10, got {self.validation_rows!r}")
        if self.int8_recipe not in INT8_RECIPES:
            e.append(f"int8_recipe must be one of {sorted(INT8_RECIPES)}, got {self.int8_recipe!r}")
        if not _number(self.atol) or self.atol <= 0:
            e.append(f"atol must be > 0, got {self.atol!r}")
        if self.quantize and not self.validation:
            e.append(
                "quantize=int8 needs validation data (--validation DIR with task=<name>/*.parquet"
                " and a label column) to check the ROC-AUC drop"
            )
        elif self.validation and not Path(self.validation).is_dir():
            e.append(f"validation directory {self.validation!r} does not exist")
        if e:
            raise ConfigError(e)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class TaskExport:
    """One published task: where it is and what the gate measured."""

    task: str
    path: Path
    parity: dict
    meta: dict


@dataclass
class ExportResult:
    out_dir: Path
    tasks: dict[str, TaskExport]
    seconds: float

    def summary(self) -> str:
        lines = [f"exported {len(self.tasks)} task(s) to {self.out_dir} in {self.seconds:.1f}s"]
        for t, te in self.tasks.items():
            for variant, rep in te.parity["variants"].items():
                line = f"  {t:<20} {variant:<5} max|Δlogit| {rep['max_abs_diff']:.2e}"
                line += "  pass" if rep["pass"] else "  (reported)"
                auc = rep.get("auc")
                if auc:
                    line += (
                        f"  AUC fp32 {auc['fp32']:.4f} int8 {auc['int8']:.4f} "
                        f"Δ {auc['delta']:+.4f} (bound -{auc['max_drop']})"
                    )
                lines.append(line)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Building blocks (also used by the benchmark)


def uses_token_types(encoder_config) -> bool:
    """BERT-style encoders embed segment ids; RoBERTa-style ones (type_vocab_size 1) do not."""
    return int(getattr(encoder_config, "type_vocab_size", 0) or 0) > 1


def export_onnx(model, path: str | Path, token_types: bool, spec: OnnxIOSpec = IO_SPEC) -> Path:
    """Trace a plain (merged or base) task model to ONNX with the spec's names and axes."""
    import torch

    enc = getattr(model, "encoder", None)
    if enc is not None and hasattr(enc, "set_attn_implementation"):
        enc.set_attn_implementation("eager")  # the attention pattern ORT's fusion matches
    model.eval()
    b, s = spec.dummy_shape
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, s // 2 :] = 0  # a padded row, so masking is traced as data, not as a constant
    args = (ids, mask, torch.zeros(b, s, dtype=torch.long)) if token_types else (ids, mask)
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about python control flow
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=spec.input_names(token_types),
            output_names=[spec.output],
            dynamic_axes=spec.dynamic_axes(token_types),
            opset_version=spec.opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


def optimize_onnx(src: str | Path, dst: str | Path, encoder_config) -> dict[str, int]:
    """ORT's transformer fusions (python pass only: the graph stays provider-neutral)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from serving.scorer import plain_layer_norms

    model_type = "bert"  # BERT, MiniLM, RoBERTa, XLM-R share the pattern
    with _quiet_logs("onnxruntime.transformers"):
        opt = optimize_model(
            str(src),
            model_type=model_type,
            num_heads=int(encoder_config.num_attention_heads),
            hidden_size=int(encoder_config.hidden_size),
            opt_level=0,
        )
        fused = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        # SkipLayerNormalization back to Add + LayerNormalization: the same arithmetic
        # (parity-gated like the rest), and a faster graph on CPU, where ORT's kernel for it
        # takes ~4x as long as the plain ops (serving.scorer's CPU sessions keep ORT from
        # fusing them back; a CUDA session fuses them again at load).
        if plain_layer_norms(opt.model):
            fused.pop("SkipLayerNormalization", None)
        opt.save_model_to_file(str(dst))
    return fused


def quantize_int8(src: str | Path, dst: str | Path, recipe: str = DEFAULT_INT8_RECIPE) -> Path:
    """Dynamic int8 of a fused fp32 graph, by one of INT8_RECIPES.

    per_channel: one weight scale per output column instead of per tensor.
    reduce_range: 7-bit weights; AVX2 CPUs without VNNI sum u8·s8 pairs in int16 and saturate
        with full-range weights, which is much of why plain int8 loses ~1 logit on MiniLM.
    ops: only these op types (["MatMul"] keeps the fused Attention, i.e. the QKV projection
        and softmax, in fp32).
    keep_fp32: "ffn_out" also keeps each layer's FFN output projection (its input is the GELU
        output, whose outliers per-tensor activation scales handle worst) in fp32.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if recipe not in INT8_RECIPES:
        raise ValueError(f"unknown int8 recipe {recipe!r}; choose from {sorted(INT8_RECIPES)}")
    r = INT8_RECIPES[recipe]
    exclude = []
    if r.get("keep_fp32") == "ffn_out":
        exclude = [
            n.name
            for n in onnx.load(str(src), load_external_data=False).graph.node
            if n.op_type == "MatMul" and "/output/dense/" in n.name and "attention" not in n.name
        ]
    with _quiet_logs("root"):
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=r["per_channel"],
            reduce_range=r["reduce_range"],
            op_types_to_quantize=r.get("ops"),
            nodes_to_exclude=exclude,
            # Fused contrib ops (Attention, SkipLayerNorm) have no type inference in the
            # quantizer; their outputs are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return Path(dst)


@contextlib.contextmanager
def _quiet_logs(name: str):
    logger = logging.getLogger(name if name != "root" else None)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def ort_session(path: str | Path, threads: int | None = None):
    """A CPU session as the Scorer builds one (the gate measures the graph, not the provider)."""
    from serving.scorer import make_session

    return make_session(path, "cpu", threads)


def run_session(sess, batch: dict[str, np.ndarray]) -> np.ndarray:
    feed = {i.name: np.ascontiguousarray(batch[i.name], dtype=np.int64) for i in sess.get_inputs()}
    return sess.run(None, feed)[0].astype(np.float32).reshape(-1)  # (B,)


# ---------------------------------------------------------------------------------------------
# Parity text: real query/ad pairs of varied length (short rows get padded in every batch).

PARITY_TEXT: tuple[tuple[str, str, str | None], ...] = (
    ("running shoes", "Trailblazer Men's Running Shoe", "Breathable mesh upper, cushioned sole."),
    (
        "waterproof hiking boots women size 8",
        "Summit Pro Waterproof Hiking Boot for Women",
        "Full-grain leather and a sealed membrane keep feet dry on wet trails. Vibram outsole "
        "grips rock and mud; padded collar and a gusseted tongue keep debris out. Available in "
        "sizes 5 to 11, regular and wide.",
    ),
    ("cheap flights paris", "Flights to Paris from $199", None),
    (
        "best noise cancelling headphones for travel",
        "QuietWave 700 Wireless Headphones",
        "Adaptive noise cancelling, 30-hour battery, fast charge: 10 minutes gives 5 hours. "
        "Foldable design with a hard case, two devices at once over Bluetooth 5.3, and a "
        "built-in mic for calls. Free returns within 30 days.",
    ),
    ("4k tv 55 inch", '55" UHD Smart TV - HDR10, Dolby Vision', "Deal of the day: save 20%."),
    ("organic dog food grain free", "Wholesome Paws Grain-Free Salmon Recipe", None),
    (
        "how to fix a leaking kitchen faucet",
        "Single-Handle Kitchen Faucet Repair Kit",
        "Includes cartridge, O-rings and seats for the most common brands. Step-by-step guide "
        "and video instructions included; no special tools needed. Lifetime warranty on parts.",
    ),
    ("gaming laptop rtx", "Apex 15 Gaming Laptop, RTX 4070, 165Hz", "16GB RAM, 1TB SSD."),
    ("yoga mat", "Eco Cork Yoga Mat 6mm", "Non-slip, sweat resistant, carrying strap included."),
    (
        "car insurance quote young driver",
        "Compare Car Insurance Quotes in Minutes",
        "New drivers can save up to 40% with telematics. Get quotes from 50+ insurers, no "
        "phone calls, cancel any time. Rated excellent by over 10,000 customers.",
    ),
    ("espresso machine with grinder", "Barista Express Espresso Maker", None),
    (
        "kids winter jacket",
        "Arctic Explorer Kids' Insulated Parka",
        "Warm to -20°C, machine washable.",
    ),
)


def parity_shapes(max_length: int) -> list[tuple[int, int]]:
    """batch 1/3/8 × seq 8/33/96/max_length (capped at max_length), never the export dummy."""
    seqs = sorted({min(s, max_length) for s in (*PARITY_SEQS, max_length)})
    shapes = [(b, s) for b in PARITY_BATCHES for s in seqs]
    assert IO_SPEC.dummy_shape not in shapes
    return shapes


def parity_batches(tokenizer_dir: Path, max_length: int) -> list[dict[str, np.ndarray]]:
    """One tokenised batch of exactly (batch, seq) tokens per parity shape."""
    from features.tokenize import PairTokenizer

    out = []
    n = len(PARITY_TEXT)
    for i, (b, s) in enumerate(parity_shapes(max_length)):
        rows = [PARITY_TEXT[(i * 5 + j) % n] for j in range(b)]
        tok = PairTokenizer(tokenizer_dir, max_length=s, pad_to_max=True)
        out.append(tok.encode(*zip(*rows)))  # (b, s) each
    return out


def _reference_logits(model, task_id: int, batches: list[dict[str, np.ndarray]]) -> list:
    """The unmerged multi-task PyTorch model's logits: what every variant must reproduce."""
    import torch

    refs = []
    with torch.no_grad():
        for b in batches:
            t = {k: torch.from_numpy(v) for k, v in b.items()}
            task_ids = torch.full((t["input_ids"].shape[0],), task_id, dtype=torch.long)
            refs.append(
                model(t["input_ids"], t["attention_mask"], task_ids, t["token_type_ids"])
                .float()
                .numpy()
            )
    return refs


def check_parity(
    sess, batches: list[dict[str, np.ndarray]], refs: list[np.ndarray], atol: float | None
) -> dict:
    """Max |ORT - reference| per shape; `atol` None only reports."""
    rows = []
    for b, ref in zip(batches, refs):
        diff = float(np.max(np.abs(run_session(sess, b) - ref)))
        bsz, seq = b["input_ids"].shape
        rows.append(
            {
                "batch": int(bsz),
                "seq": int(seq),
                "max_abs_diff": diff,
                "pass": bool(atol is None or diff <= atol),
            }
        )
    return {
        "atol": atol,
        "gated": atol is not None,
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "pass": all(r["pass"] for r in rows),
        "shapes": rows,
    }


# ---------------------------------------------------------------------------------------------
# Validation rows (for the int8 AUC guard)


def load_validation(root: str | Path, task: str, max_rows: int) -> dict:
    """Labelled rows of one task from ROOT/task=<task>/*.parquet (rows without a 0/1 label or
    text are skipped and counted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from features.schema import TASK_DIR_PREFIX

    d = Path(root) / f"{TASK_DIR_PREFIX}{task}"
    files = sorted(d.rglob("*.parquet")) if d.is_dir() else []
    if not files:
        raise QuantizationError(
            f"no validation data for task {task!r}: expected parquet files under {d}"
        )
    tables, n = [], 0
    for f in files:
        schema = pq.read_schema(f)
        missing = [c for c in ("query", "ad_title", "label") if c not in schema.names]
        if missing:
            raise QuantizationError(f"validation file {f} lacks column(s) {missing}")
        cols = [c for c in ("query", "ad_title", "ad_description", "label") if c in schema.names]
        t = pq.read_table(f, columns=cols)
        tables.append(t)
        n += t.num_rows
        if n >= max_rows:
            break
    t = pa.concat_tables(tables, promote_options="permissive").slice(0, max_rows)
    q = t.column("query").to_pylist()
    ti = t.column("ad_title").to_pylist()
    de = t.column("ad_description").to_pylist() if "ad_description" in t.column_names else None
    lab = t.column("label").to_pylist()
    keep = [
        i
        for i in range(t.num_rows)
        if q[i] is not None and ti[i] is not None and lab[i] is not None and lab[i] in (0, 1)
    ]
    return {
        "query": [q[i] for i in keep],
        "ad_title": [ti[i] for i in keep],
        "ad_description": [de[i] for i in keep] if de is not None else None,
        "label": np.asarray([int(lab[i]) for i in keep], dtype=np.int64),
        "skipped": t.num_rows - len(keep),
    }


def validation_logits(sess, tokenizer_dir: Path, max_length: int, rows: dict, batch: int = 64):
    """ORT logits (N,) of validation rows, in the calls the Scorer makes for them: length
    order, split into `length_groups` of at most `batch` rows. Dynamic int8 quantises each
    call's activations with that call's range, so only the same calls give the Scorer's
    numbers."""
    from features.tokenize import PairTokenizer, trim_batch
    from serving.scorer import CALL_COST_TOKENS, CPU, call_rows

    enc = PairTokenizer(tokenizer_dir, max_length=max_length).encode(
        rows["query"], rows["ad_title"], rows["ad_description"]
    )
    cost = CALL_COST_TOKENS.get(sess.get_providers()[0], CALL_COST_TOKENS[CPU])
    out = np.empty(len(enc["input_ids"]), dtype=np.float32)
    for idx in call_rows(enc["attention_mask"].sum(1), batch, cost):
        out[idx] = run_session(sess, trim_batch({k: v[idx] for k, v in enc.items()}))
    return out


def auc_report(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, max_drop: float) -> dict:
    from sklearn.metrics import roc_auc_score

    a32, a8 = float(roc_auc_score(labels, fp32)), float(roc_auc_score(labels, int8))
    return {
        "rows": int(len(labels)),
        "positives": int(labels.sum()),
        "fp32": a32,
        "int8": a8,
        "delta": a8 - a32,
        "max_drop": float(max_drop),
        "pass": bool(a32 - a8 <= max_drop),
        "max_abs_logit_diff": float(np.max(np.abs(fp32 - int8))),
        "mean_abs_logit_diff": float(np.mean(np.abs(fp32 - int8))),
    }


# ---------------------------------------------------------------------------------------------
# Per-task export


MergeFn = Callable[[object, str], object]


def export_task(
    model,
    ckpt_cfg: dict,
    task: str,
    out: Path,
    tokenizer_src: Path,
    cfg: ExportConfig,
    merge_fn: MergeFn | None = None,
) -> TaskExport:
    """Merge, export, fuse, (quantize), gate one task into `out` (a fresh folder)."""
    from models.checkpoint import TOKENIZER_FILES

    merge_fn = merge_fn or _merge
    out.mkdir(parents=True)
    t_id = model.tasks.id(task)
    max_length = int(ckpt_cfg["max_length"])
    enc_cfg = model.encoder.config
    token_types = uses_token_types(enc_cfg)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).is_file():
            shutil.copy2(tokenizer_src / name, out / name)

    merged = merge_fn(model, task)
    raw = out / "model.raw.onnx"
    export_onnx(merged, raw, token_types)
    fp32 = out / MODEL_FILES["fp32"]
    fused = optimize_onnx(raw, fp32, enc_cfg) if cfg.optimize else {}
    if cfg.optimize:
        raw.unlink()
    else:
        raw.rename(fp32)

    batches = parity_batches(out, max_length)
    refs = _reference_logits(model, t_id, batches)
    sess32 = ort_session(fp32)
    variants = {"fp32": check_parity(sess32, batches, refs, cfg.atol)}
    if not variants["fp32"]["pass"]:
        failures = [s for s in variants["fp32"]["shapes"] if not s["pass"]]
        raise ParityError(task, "fp32", failures, cfg.atol)
    variants["fp32"]["file"] = MODEL_FILES["fp32"]

    if cfg.quantize == "int8":
        q = quantize_int8(fp32, out / MODEL_FILES["int8"], cfg.int8_recipe)
        sess8 = ort_session(q)
        rep = check_parity(sess8, batches, refs, None)
        rows = load_validation(cfg.validation, task, cfg.validation_rows)
        if len(set(rows["label"].tolist())) < 2:
            raise QuantizationError(
                f"validation rows of task {task!r} have a single label class: ROC-AUC undefined"
            )
        auc = auc_report(
            validation_logits(sess32, out, max_length, rows),
            validation_logits(sess8, out, max_length, rows),
            rows["label"],
            cfg.max_auc_drop,
        )
        auc["skipped_rows"] = rows["skipped"]
        # int8 is gated by the AUC bound; its logit difference is reported, not gated.
        rep.update({"file": MODEL_FILES["int8"], "recipe": cfg.int8_recipe, "auc": auc})
        rep["pass"] = auc["pass"]
        variants["int8"] = rep
        if not auc["pass"]:
            raise QuantizationError(
                f"int8 model of task {task!r} loses {auc['fp32'] - auc['int8']:.4f} ROC-AUC on "
                f"{auc['rows']} validation rows (fp32 {auc['fp32']:.4f}, int8 {auc['int8']:.4f}); "
                f"the bound is {cfg.max_auc_drop}: nothing published (raise --max-auc-drop or "
                "export without --quantize)"
            )

    parity = {"task": task, "reference": "unmerged PyTorch multi-task model", "variants": variants}
    (out / PARITY_FILE).write_text(json.dumps(parity, indent=2))
    meta = _task_meta(model, ckpt_cfg, task, out, cfg, fused, token_types, variants)
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return TaskExport(task, out, parity, meta)


def _merge(model, task: str):
    from models.merge import merge_task

    return merge_task(model, task)


def _task_meta(model, ckpt_cfg, task, out, cfg, fused, token_types, variants) -> dict:
    extra = ckpt_cfg.get("extra") or {}
    serving = "int8" if "int8" in variants else "fp32"
    files = {v: MODEL_FILES[v] for v in variants}
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "task": task,
        "task_id": model.tasks.id(task),
        "model_version": _file_hash(out / files[serving]),
        "source_model": cfg.source,
        "source_run_id": cfg.source_info.get("run_id"),
        "source_registered_model": cfg.source_info.get("name"),
        "source_registered_version": cfg.source_info.get("version"),
        "base_model": ckpt_cfg.get("base_model"),
        "base_architecture": ckpt_cfg.get("base_architecture"),
        "base_fingerprint": ckpt_cfg.get("base_fingerprint"),
        "adapter": ckpt_cfg.get("adapter", {}).get("variant"),
        "pooling": ckpt_cfg.get("pooling"),
        "max_length": int(ckpt_cfg["max_length"]),
        "max_positions": int(getattr(model.encoder.config, "max_position_embeddings", 512)),
        "threshold": _threshold(extra, task),
        "metrics": _metrics(extra, task),
        "io": {**asdict(IO_SPEC), "inputs": IO_SPEC.input_names(token_types)},
        "files": files,
        "serving_variant": serving,
        "fused_ops": fused,
        "parity_max_abs_diff": {v: r["max_abs_diff"] for v, r in variants.items()},
        "versions": _versions(ckpt_cfg),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _threshold(extra: dict, task: str) -> float | None:
    for key in ("thresholds", "threshold"):
        v = extra.get(key)
        if isinstance(v, dict):
            v = v.get(task)
        if _number(v):
            return float(v)
    return None


def _metrics(extra: dict, task: str) -> dict:
    """Per-task metrics recorded by training (extra["metrics"][task] or flat "<task>/x")."""
    m = extra.get("metrics") or {}
    out = dict(m.get(task, {})) if isinstance(m.get(task), dict) else {}
    for k, v in m.items():
        if isinstance(k, str) and k.startswith(f"{task}/") and _number(v):
            out[k.split("/", 1)[1]] = v
    return {k: float(v) for k, v in out.items() if _number(v)}


def _versions(ckpt_cfg: dict) -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "adrel": ckpt_cfg.get("code_version"),
        "export_code": _code_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": IO_SPEC.opset,
    }


def _code_version() -> str:
    from models.checkpoint import code_version

    return code_version()


def _file_hash(path: Path) -> str:
    from pipeline.stages import file_sha256

    return file_sha256(path)[:12]


# ---------------------------------------------------------------------------------------------
# The whole export


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    cfg: ExportConfig | None = None,
    merge_fn: MergeFn | None = None,
) -> ExportResult:
    """Export every (selected) task of a checkpoint; publish all or nothing.

    `merge_fn(model, task)` replaces the merge (tests inject a broken one to prove the gate).
    """
    from models.checkpoint import load_checkpoint

    cfg = cfg or ExportConfig()
    t0 = time.perf_counter()
    ckpt = Path(ckpt_dir)
    model, ckpt_cfg = load_checkpoint(ckpt)
    tasks = cfg.tasks or model.tasks.names
    unknown = [t for t in tasks if t not in model.tasks]
    if unknown:
        raise ConfigError([f"unknown task(s) {unknown}; the checkpoint has {model.tasks.names}"])
    out = Path(out_dir)
    check_out(out, ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    try:
        tmp.mkdir()
        exported = {t: export_task(model, ckpt_cfg, t, tmp / t, ckpt, cfg, merge_fn) for t in tasks}
        index = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "tasks": list(exported),
            "source_model": cfg.source or str(ckpt),
            "source_run_id": cfg.source_info.get("run_id"),
            "variants": sorted({v for te in exported.values() for v in te.meta["files"]}),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        replace_dir(tmp, out)  # readers see the old export or the new one, never half
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    published = {t: TaskExport(t, out / t, te.parity, te.meta) for t, te in exported.items()}
    return ExportResult(out, published, time.perf_counter() - t0)


def check_out(out: str | os.PathLike, ckpt: str | os.PathLike | None = None) -> None:
    """Only an empty folder or a previous export may be replaced, never the checkpoint's own."""
    out = Path(out)
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / INDEX_FILE).is_file())
    ):
        raise OutputError(
            f"--out {out} exists and is not an adrel export (no {INDEX_FILE}); refusing to "
            "overwrite it: choose another directory"
        )
    if ckpt is not None:
        src, dst = Path(ckpt).resolve(), out.resolve()
        if dst == src or src in dst.parents:
            raise OutputError(
                f"--out {out} is inside the checkpoint {ckpt}: choose another directory"
            )


def read_index(export_dir: str | Path) -> dict:
    p = Path(export_dir) / INDEX_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{export_dir} is not an adrel export: no {INDEX_FILE}")
    return json.loads(p.read_text())
