"""The runtime Scorer: one exported task model, scored with tokenizers + onnxruntime + numpy.

Never imports torch or transformers (a test checks it in a fresh interpreter), nor the adapter
code: serving runs the merged plain graph that pipeline.export wrote and parity-gated.

    scorer = Scorer("export/homedepot")            # or load_scorers("models:/adrel@champion")
    scorer.score(queries, titles, descriptions)    # (N,) float32 probabilities
    scorer.score_tokens(input_ids, attention_mask, token_type_ids)   # (N,) logits

Execution provider: CUDA (with IO binding) only when a GPU is really usable (libcuda answers
and a CUDA session keeps the CUDA provider), else CPU, without ORT's fallback error spam.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import threading
from pathlib import Path

import numpy as np

from features.tokenize import PairTokenizer, trim_batch

META_FILE = "meta.json"
INDEX_FILE = "index.json"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_BATCH = 64
# Fixed cost of one ORT call in padded tokens (see length_groups). CPU, MiniLM-L6 int8 on 2
# cores: one 26-token row costs ~7.4 ms, a token in a batch ~0.19 ms, so ~13 tokens fixed.
# 16 rows of 10–45 tokens: 77–90 ms in ~3 calls at 16, 94–95 ms as one call, 98–110 ms
# as one call per row.
CALL_COST_TOKENS = {CPU: 16.0, CUDA: 1024.0}
# ORT graph rewrites a CPU session must not apply. SkipLayerNormFusion folds Add + Add +
# LayerNormalization back into com.microsoft.SkipLayerNormalization, whose CPU kernel (ORT
# 1.31) takes ~4x as long as the plain ops: 61 vs 15 us for 26 tokens x 384, 341 vs 76 us for
# 180 (one thread). pipeline.export writes the plain ops; CUDA sessions keep the fusion.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


class ScorerError(ValueError):
    """A scorer cannot be built or called: names the directory, task, field or shape."""


# ---------------------------------------------------------------------------------------------
# Providers


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when ORT has a CUDA provider *and* the driver reports at least one device.

    onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU and then falls
    back to CPU with a screen of errors; asking libcuda first avoids both the spam and a slow
    failed session.
    """
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


@functools.lru_cache(maxsize=1)
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels (a CUDA build of torch from pip brings
    them) before the first CUDA session. onnxruntime-gpu finds them by itself only where torch
    was imported first, and the Scorer never imports torch: without this a CUDA session could
    silently lose its provider to CPU (make_session's fallback)."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is not None:
        with contextlib.suppress(Exception):  # libraries on the system path may still do
            preload()


def choose_providers(providers: str | list[str] = "auto") -> list[str]:
    """ "auto": CUDA then CPU when a GPU is usable, else CPU; "cpu"/"cuda"; or an explicit list."""
    if isinstance(providers, (list, tuple)):
        return list(providers)
    p = str(providers).lower()
    if p == "cpu":
        return [CPU]
    if p in ("cuda", "gpu"):
        if not cuda_usable():
            raise ScorerError("providers='cuda' but no usable CUDA device/onnxruntime-gpu here")
        return [CUDA, CPU]
    if p == "auto":
        return [CUDA, CPU] if cuda_usable() else [CPU]
    raise ScorerError(f"providers must be 'auto', 'cpu', 'cuda' or a list, got {providers!r}")


def make_session(
    path: str | Path | bytes,
    providers: str | list[str] = "auto",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    spin_wait: bool = True,
    optimized_model_path: str | Path | None = None,
):
    """An ORT session on the chosen providers; a CUDA session that silently lost CUDA is
    rebuilt on CPU. A CPU session leaves out the rewrites in CPU_DISABLED_OPTIMIZERS.

    spin_wait: ORT's intra-op threads spin for a while after each run, waiting for the next.
    That helps a process that owns its cores (batch scoring); where other processes share them
    (a Serve replica beside its HTTP proxy), the spinning takes their CPU: turn it off there.
    optimized_model_path: also write the graph as ORT runs it (after its rewrites) there.
    """
    import onnxruntime as ort

    def options():
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: provider fallbacks are handled here
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin_wait:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_threads:
            so.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads:
            so.inter_op_num_threads = int(inter_op_threads)
        if optimized_model_path:
            so.optimized_model_filepath = str(optimized_model_path)
        return so

    chosen = choose_providers(providers)
    if CUDA in chosen:
        preload_cuda_libraries()
    cpu_only = {"disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS)}
    src = path if isinstance(path, bytes) else str(path)  # a file, or a serialized graph
    sess = ort.InferenceSession(
        src, options(), providers=chosen, **({} if CUDA in chosen else cpu_only)
    )
    if CUDA in chosen and CUDA not in sess.get_providers():
        sess = ort.InferenceSession(src, options(), providers=[CPU], **cpu_only)
    return sess


def plain_layer_norms(model) -> int:
    """Rewrite each com.microsoft SkipLayerNormalization of an onnx.ModelProto (x + skip +
    bias, then LayerNorm) as Add nodes and a standard LayerNormalization, in place; returns how
    many were rewritten. The same arithmetic in the ops that run faster on CPU (see
    CPU_DISABLED_OPTIMIZERS). A variant that also returns the sum or statistics stays fused.
    """
    from onnx import helper

    nodes, count = [], 0
    for n in model.graph.node:
        outputs = [o for o in n.output if o]
        if n.op_type != "SkipLayerNormalization" or n.domain != "com.microsoft" or len(outputs) > 1:
            nodes.append(n)
            continue
        x, skip, gamma, beta, bias = (list(n.input) + ["", "", ""])[:5]
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-12)
        out = n.output[0]
        if bias:
            nodes.append(helper.make_node("Add", [x, bias], [f"{out}/biased"]))
            x = f"{out}/biased"
        nodes.append(helper.make_node("Add", [x, skip], [f"{out}/sum"]))
        nodes.append(
            helper.make_node(
                "LayerNormalization",
                [f"{out}/sum", gamma] + ([beta] if beta else []),
                [out],
                axis=-1,
                epsilon=eps,
            )
        )
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return count


# ---------------------------------------------------------------------------------------------
# The Scorer


class Scorer:
    """Scores (query, ad_title, ad_description) rows with one task's exported ONNX model.

    task_dir: an export folder (model.onnx, meta.json, tokenizer.json).
    providers: "auto" (CUDA when usable, else CPU), "cpu", "cuda" or an ORT provider list.
    intra_op_threads / inter_op_threads: ORT thread pools (None: ORT's default).
    variant: "fp32" or "int8" (default: the one the export marked for serving).
    model_version: label reported with scores (default: meta's model_version, a file hash;
        load_scorers sets `<name>/<version>` for registered models).
    batch_size: rows per ORT call in `logits`/`score`, at most.
    solo_threads: on CPU, a second session with this many intra-op threads, for calls made
        with `solo=True` (a serving replica's call that runs alone while its other model
        slots are idle gets the cores they would use). It costs a second copy of the weights
        in memory. None: one session.
    call_cost_tokens: the fixed cost of one ORT call, in padded tokens. `logits`/`score` split
        a batch (in length order) into calls where padding would cost more than another call
        (`length_groups`). Default: 16 on CPU (a short call costs little beyond its tokens),
        1024 on CUDA (launch costs dominate, padding is cheap: one call per batch).
    """

    def __init__(
        self,
        task_dir: str | os.PathLike,
        providers: str | list[str] = "auto",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        variant: str | None = None,
        model_version: str | None = None,
        batch_size: int = DEFAULT_BATCH,
        spin_wait: bool = True,
        call_cost_tokens: float | None = None,
        solo_threads: int | None = None,
    ):
        self.task_dir = Path(task_dir)
        meta_path = self.task_dir / META_FILE
        if not meta_path.is_file():
            raise ScorerError(f"{self.task_dir} is not an exported task model: no {META_FILE}")
        self.meta: dict = json.loads(meta_path.read_text())
        files = self.meta.get("files") or {"fp32": "model.onnx"}
        self.variant = variant or self.meta.get("serving_variant") or "fp32"
        if self.variant not in files:
            raise ScorerError(
                f"{self.task_dir} has no {self.variant!r} model (variants: {sorted(files)})"
            )
        if batch_size < 1:
            raise ScorerError(f"batch_size must be >= 1, got {batch_size}")
        self.task: str = self.meta["task"]
        self.max_length: int = int(self.meta["max_length"])
        self.max_positions: int = int(self.meta.get("max_positions") or 512)
        self.model_version: str = str(model_version or self.meta.get("model_version") or "unknown")
        self.threshold: float | None = self.meta.get("threshold")
        self.batch_size = int(batch_size)
        self.tokenizer = PairTokenizer(self.task_dir, max_length=self.max_length)
        self._tok_lock = threading.Lock()  # the tokenizer toggles truncation per call
        graph: Path | bytes = self.task_dir / files[self.variant]
        # An export written before pipeline.export wrote plain LayerNorms: rewrite in memory.
        self.rewritten_layer_norms = 0
        if (self.meta.get("fused_ops") or {}).get("SkipLayerNormalization"):
            graph, self.rewritten_layer_norms = _plain_graph(graph)
        self.session = make_session(
            graph,
            providers,
            intra_op_threads,
            inter_op_threads,
            spin_wait,
        )
        self.providers: list[str] = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self._cuda = self.providers[0] == CUDA
        self.solo_session = None
        if solo_threads and not self._cuda:
            self.solo_session = make_session(
                graph,
                [CPU],
                solo_threads,
                inter_op_threads,
                spin_wait,
            )
        if call_cost_tokens is None:
            call_cost_tokens = CALL_COST_TOKENS[CUDA if self._cuda else CPU]
        if not call_cost_tokens >= 0:
            raise ScorerError(f"call_cost_tokens must be >= 0, got {call_cost_tokens}")
        self.call_cost_tokens = float(call_cost_tokens)

    def __repr__(self) -> str:
        return (
            f"Scorer(task={self.task!r}, version={self.model_version!r}, "
            f"variant={self.variant!r}, providers={self.providers})"
        )

    # -- scoring --------------------------------------------------------------------------

    def encode(self, queries, titles, descriptions=None) -> dict[str, np.ndarray]:
        with self._tok_lock:
            return self.tokenizer.encode(queries, titles, descriptions)

    def logits(self, queries, titles, descriptions=None, solo: bool = False) -> np.ndarray:
        """(N,) float32 logits; rows go to ORT in length order, `batch_size` at a time.
        solo: run on the solo session when there is one (see the class docstring)."""
        queries, titles = list(queries), list(titles)
        if descriptions is not None:
            descriptions = list(descriptions)
            if len(descriptions) != len(queries):
                raise ScorerError(f"{len(queries)} queries but {len(descriptions)} ad descriptions")
        if len(titles) != len(queries):
            raise ScorerError(f"{len(queries)} queries but {len(titles)} ad titles")
        if not queries:
            return np.zeros(0, dtype=np.float32)
        enc = self.encode(queries, titles, descriptions)
        out = np.empty(len(queries), dtype=np.float32)
        lengths = enc["attention_mask"].sum(1)
        for idx in call_rows(lengths, self.batch_size, self.call_cost_tokens):
            out[idx] = self.score_tokens(**{k: v[idx] for k, v in enc.items()}, solo=solo)
        return out

    def score(self, queries, titles, descriptions=None, solo: bool = False) -> np.ndarray:
        """(N,) float32 relevance probabilities."""
        return sigmoid(self.logits(queries, titles, descriptions, solo=solo))

    def score_tokens(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray | None = None,
        solo: bool = False,
    ) -> np.ndarray:
        """(N,) float32 logits of a pre-tokenised batch (N, L); trimmed to its longest row."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        batch = self._check_tokens(batch)
        if batch["input_ids"].shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        batch = trim_batch(batch)
        feed = {n: np.ascontiguousarray(batch[n], dtype=np.int64) for n in self.input_names}
        if self._cuda:
            return self._run_cuda(feed)
        sess = self.solo_session if solo and self.solo_session is not None else self.session
        return sess.run([self.output_name], feed)[0].astype(np.float32).reshape(-1)

    def _run_cuda(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        # IO binding: inputs copied once to the device, the output allocated there and
        # copied back once, instead of ORT's per-run staging.
        io = self.session.io_binding()
        for name, arr in feed.items():
            io.bind_cpu_input(name, arr)
        io.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0].astype(np.float32).reshape(-1)

    def _check_tokens(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        shape = None
        for name, arr in batch.items():
            a = np.asarray(arr)
            if a.ndim != 2:
                raise ScorerError(f"{name} must be 2-D (batch, seq), got shape {a.shape}")
            if shape is not None and a.shape != shape:
                raise ScorerError(f"{name} has shape {a.shape} but input_ids has {shape}")
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise ScorerError(f"{name} must hold integers, got {a.dtype}")
            shape = shape or a.shape
            out[name] = a
        if "token_type_ids" in self.input_names and "token_type_ids" not in out:
            out["token_type_ids"] = np.zeros(shape, dtype=np.int64)
        width = int(out["attention_mask"].sum(1).max()) if out["attention_mask"].size else 0
        if width > self.max_positions:
            raise ScorerError(
                f"rows of {width} tokens exceed the model's {self.max_positions} positions"
            )
        return out


def _plain_graph(path: Path) -> tuple[bytes | Path, int]:
    """(the serialized graph with plain LayerNorms, how many were rewritten); the file itself
    when there is nothing to rewrite."""
    import onnx

    model = onnx.load(str(path))
    count = plain_layer_norms(model)
    return (model.SerializeToString(), count) if count else (path, 0)


def call_rows(lengths: np.ndarray, max_rows: int, call_cost: float) -> list[np.ndarray]:
    """Row indices of each model call for rows of these token lengths: length order, split
    by `length_groups`. The export's int8 validation uses the same calls (dynamic int8
    depends on what shares a call)."""
    order = np.argsort(lengths, kind="stable")
    return [order[lo:hi] for lo, hi in length_groups(lengths[order], max_rows, call_cost)]


def length_groups(lengths: np.ndarray, max_rows: int, call_cost: float) -> list[tuple[int, int]]:
    """Split rows sorted by length into model calls of at most max_rows rows, [lo, hi) each,
    with the least work: a call costs `call_cost` plus rows × its longest row, in tokens.

    Every row of a call is padded to the call's longest, so one call over short and long rows
    pays for padding, and many calls pay the fixed cost many times. Minimised exactly over the
    contiguous splits (rows are in length order), O(rows × max_rows).
    """
    n = len(lengths)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for hi in range(1, n + 1):
        widest = float(lengths[hi - 1])  # sorted: the last row of a call is its longest
        los = np.arange(max(0, hi - max_rows), hi)
        costs = best[los] + call_cost + (hi - los) * widest
        k = int(np.argmin(costs))
        best[hi], cut[hi] = costs[k], los[k]
    groups = []
    hi = n
    while hi > 0:
        groups.append((int(cut[hi]), hi))
        hi = int(cut[hi])
    return groups[::-1]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float32 probabilities without overflow for large |x|."""
    x = np.asarray(logits, dtype=np.float32)
    return np.exp(-np.logaddexp(np.float32(0), -x)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Loading one or many task models


def load_scorers(
    model: str | os.PathLike,
    tasks: list[str] | None = None,
    providers: str | list[str] = "auto",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    tracking_uri: str | None = None,
    spin_wait: bool = True,
    solo_threads: int | None = None,
) -> dict[str, Scorer]:
    """`{task: Scorer}` from any model reference.

    model: an export dir (index.json), one task dir (meta.json), `models:/<name>/<version>`,
        `models:/<name>/latest`, `models:/<name>@<alias>`, `runs:/<id>/<path>`, or a name
        prefix with an alias (`models:/adrel@champion`: every `adrel-<task>` carrying it).
    tasks: keep only these (an unknown task is an error naming the available ones).
    """
    kw = {
        "providers": providers,
        "intra_op_threads": intra_op_threads,
        "inter_op_threads": inter_op_threads,
        "spin_wait": spin_wait,
        "solo_threads": solo_threads,
    }
    s = str(model)
    if s.startswith(("models:/", "runs:/")):
        found = _registry_dirs(s, tasks, tracking_uri)
    else:
        found = {t: (d, None, None) for t, d in _local_dirs(Path(s)).items()}
    if tasks is not None:
        missing = [t for t in tasks if t not in found]
        if missing:
            raise ScorerError(f"{s} has no model for task(s) {missing}; it has {sorted(found)}")
        found = {t: found[t] for t in tasks}
    out = {}
    for task, (d, name, version) in found.items():
        sc = Scorer(d, model_version=version, **kw)
        if name:
            sc.meta["registered_name"] = name
        if version:
            sc.meta["registered_version"] = version
        out[task] = sc
    return out


def _local_dirs(root: Path) -> dict[str, Path]:
    """Task folders of an export dir, a single task dir, or an MLflow model folder."""
    if not root.is_dir():
        raise ScorerError(f"model {str(root)!r} is not a directory or a models:/ or runs:/ URI")
    if (root / INDEX_FILE).is_file():
        index = json.loads((root / INDEX_FILE).read_text())
        return {t: root / t for t in index["tasks"]}
    if (root / META_FILE).is_file():
        return {json.loads((root / META_FILE).read_text())["task"]: root}
    for marker in (INDEX_FILE, META_FILE):  # a downloaded MLflow model wraps the export
        hits = sorted(root.rglob(marker), key=lambda p: (len(p.parts), str(p)))
        if hits:
            return _local_dirs(hits[0].parent)
    raise ScorerError(f"{root} holds no exported model ({INDEX_FILE} or {META_FILE})")


def _registry_dirs(uri: str, tasks, tracking_uri) -> dict[str, tuple[Path, str | None, str | None]]:
    from pipeline import model_uri as mu

    ref = mu.parse_model_uri(uri)
    targets = [uri]
    if (
        ref.kind == "models"
        and ref.alias
        and not mu.registered_model_exists(ref.name, tracking_uri)
    ):
        # models:/<prefix>@<alias>: that alias on every task model under the prefix.
        versions = mu.task_model_versions(ref.name, ref.alias, tasks, tracking_uri)
        if not versions:
            raise ScorerError(
                f"no registered model {ref.name!r} and no task model {ref.name}-<task> "
                f"with alias {ref.alias!r}"
            )
        targets = list(versions.values())
    out = {}
    for target in targets:
        res = mu.resolve_model(target, tracking_uri=tracking_uri)
        for task, d in _local_dirs(res.path).items():
            out[task] = (d, res.name, res.version)
    return out
