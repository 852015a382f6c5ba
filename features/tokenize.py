"""Query–ad pair tokenisation, shared by training, batch scoring and online scoring.

Uses the `tokenizers` library and numpy only (no torch, no transformers), so the scoring
runtime can import it. Pairs are encoded as (query, ad text) where the ad text is the title
followed by the description when there is one. Truncation cuts the ad side first; a query is
only cut when it alone would leave fewer than `min_ad_tokens` tokens for the ad.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

AD_SEPARATOR = " | "
TASK_PREFIX_SEPARATOR = ": "
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def prefix_queries(queries, task_names) -> list[str]:
    """Prepend each row's task name to its query: "<task>: <query>".

    The input of variants that learn the task from the text (`lora_task_prefix`; checkpoints
    record it as config["task_prefix"]). Pure, so training and every scorer apply the same one.
    """
    queries, task_names = list(queries), list(task_names)
    if len(queries) != len(task_names):
        raise ValueError(f"{len(queries)} queries but {len(task_names)} task names")
    return [f"{t}{TASK_PREFIX_SEPARATOR}{q}" for q, t in zip(queries, task_names)]


def trim_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut fixed-width token arrays to the longest real row of this batch (dynamic padding).

    Rows tokenised with `pad_to_max=True` (as stored by the Ray ingest) share one width; a
    consumer trims each batch so it pays only for the tokens its longest row has.
    """
    mask = batch["attention_mask"]
    width = int(mask.sum(axis=1).max()) if mask.size else 0
    out = dict(batch)
    for c in TOKEN_COLUMNS:
        if c in out:
            out[c] = out[c][:, :width]
    return out


def ad_text(titles, descriptions=None) -> list[str]:
    """Join ad title and (optional, nullable) description into the second segment's text."""
    titles = [str(t) for t in titles]
    if descriptions is None:
        return titles
    out = []
    for t, d in zip(titles, descriptions):
        d = "" if d is None or (isinstance(d, float) and d != d) else str(d).strip()
        out.append(f"{t}{AD_SEPARATOR}{d}" if d else t)
    return out


class PairTokenizer:
    """Encodes (query, ad_title, ad_description) rows into padded int64 arrays.

    Callable on a `dict[str, np.ndarray]` batch (the Ray Data pattern): adds `input_ids`,
    `attention_mask`, `token_type_ids` (N, L) where L is the longest row in the batch
    (dynamic padding) unless `pad_to_max` is set. With `task_prefix`, the batch's `task`
    column is prepended to each query (see `prefix_queries`).
    """

    def __init__(
        self,
        tokenizer: str | Path | Tokenizer,
        max_length: int = 128,
        min_ad_tokens: int = 16,
        pad_to_max: bool = False,
        task_prefix: bool = False,
    ):
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        if isinstance(tokenizer, Tokenizer):
            self.tok = tokenizer
        else:
            path = Path(tokenizer)
            if path.is_dir():
                path = path / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"no tokenizer.json at {path}")
            self.tok = Tokenizer.from_file(str(path))
        self.max_length = int(max_length)
        self.min_ad_tokens = min(int(min_ad_tokens), self.max_length // 4)
        self.pad_to_max = pad_to_max
        self.task_prefix = bool(task_prefix)
        self.tok.no_padding()
        self.tok.no_truncation()
        self.specials = self.tok.num_special_tokens_to_add(is_pair=True)
        self.pad_id = self._pad_id()

    def _pad_id(self) -> int:
        for tok in ("[PAD]", "<pad>"):
            tid = self.tok.token_to_id(tok)
            if tid is not None:
                return tid
        return 0

    def encode(self, queries, titles, descriptions=None) -> dict[str, np.ndarray]:
        queries = [str(q) for q in queries]
        ads = ad_text(titles, descriptions)
        if len(queries) != len(ads):
            raise ValueError(f"{len(queries)} queries but {len(ads)} ads")
        if not queries:
            empty = np.zeros((0, 0), dtype=np.int64)
            return {c: empty.copy() for c in TOKEN_COLUMNS}
        queries = self._cap_queries(queries)
        self.tok.enable_truncation(self.max_length, strategy="only_second")
        try:
            encs = self.tok.encode_batch(list(zip(queries, ads)))
        finally:
            self.tok.no_truncation()
        return self._to_arrays(encs)

    def _cap_queries(self, queries: list[str]) -> list[str]:
        # Queries that alone leave less than min_ad_tokens for the ad are cut (at a token
        # boundary, through the offsets) so that "only_second" truncation always succeeds.
        budget = self.max_length - self.specials - self.min_ad_tokens
        q_encs = self.tok.encode_batch(queries, add_special_tokens=False)
        out = list(queries)
        for i, e in enumerate(q_encs):
            if len(e.ids) > budget:
                out[i] = queries[i][: e.offsets[budget - 1][1]]
        return out

    def _to_arrays(self, encs) -> dict[str, np.ndarray]:
        lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        L = self.max_length if self.pad_to_max else int(lengths.max())
        n = len(encs)
        ids = np.full((n, L), self.pad_id, dtype=np.int64)
        types = np.zeros((n, L), dtype=np.int64)
        for i, e in enumerate(encs):
            ids[i, : lengths[i]] = e.ids
            types[i, : lengths[i]] = e.type_ids
        mask = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        desc = batch.get("ad_description")
        queries = batch["query"]
        if self.task_prefix:
            if "task" not in batch:
                raise ValueError("task_prefix is set but the batch has no 'task' column")
            queries = prefix_queries(queries, batch["task"])
        out = dict(batch)
        out.update(self.encode(queries, batch["ad_title"], desc))
        return out
