"""Pair tokenisation: ad side truncated first, dynamic padding, batch-dict interface."""

from __future__ import annotations

import numpy as np
import pytest

from features.tokenize import PairTokenizer, ad_text, trim_batch


@pytest.fixture(scope="module")
def tok(minilm_dir):
    return PairTokenizer(minilm_dir, max_length=32)


def test_pair_layout_and_dynamic_padding(tok):
    b = tok.encode(
        ["red shoes", "a much longer query about waterproof hiking boots"], ["Nike", "Boots"]
    )
    ids, mask, types = b["input_ids"], b["attention_mask"], b["token_type_ids"]
    assert ids.dtype == np.int64 and ids.shape == mask.shape == types.shape
    assert ids.shape[1] == mask[1].sum()  # padded to the longest row only
    assert mask[0].sum() < ids.shape[1] and (ids[0][mask[0] == 0] == 0).all()
    cls, sep = tok.tok.token_to_id("[CLS]"), tok.tok.token_to_id("[SEP]")
    n0 = mask[0].sum()
    assert ids[0, 0] == cls and ids[0, n0 - 1] == sep and (ids[0, :n0] == sep).sum() == 2
    assert types[0, 1] == 0 and types[0, n0 - 2] == 1


def test_ad_side_is_truncated_first(tok):
    query = "blue denim jacket"
    long_ad = "jacket " * 100
    b = tok.encode([query], [long_ad])
    assert b["input_ids"].shape[1] == 32
    q_ids = tok.tok.encode(query, add_special_tokens=False).ids
    assert list(b["input_ids"][0, 1 : 1 + len(q_ids)]) == q_ids  # the query survives whole


def test_overlong_query_is_cut_but_ad_keeps_tokens(tok):
    b = tok.encode(["word " * 200], ["Nike Air Max"])
    types = b["token_type_ids"][0]
    assert b["input_ids"].shape[1] <= 32
    ad_ids = tok.tok.encode("Nike Air Max", add_special_tokens=False).ids
    assert types.sum() == len(ad_ids) + 1  # the whole ad + final [SEP] survive


def test_description_is_joined_and_nullable():
    assert ad_text(["T"], [None]) == ["T"]
    assert ad_text(["T"], [float("nan")]) == ["T"]
    assert ad_text(["T"], ["  "]) == ["T"]
    assert ad_text(["T"], ["desc"]) == ["T | desc"]


def test_pad_to_max_then_trim_equals_dynamic(minilm_dir):
    fixed = PairTokenizer(minilm_dir, max_length=40, pad_to_max=True)
    dyn = PairTokenizer(minilm_dir, max_length=40)
    args = (["q one", "query two is longer"], ["title", "another title"], [None, "a description"])
    a, b = trim_batch(fixed.encode(*args)), dyn.encode(*args)
    assert fixed.encode(*args)["input_ids"].shape[1] == 40
    for k in b:
        assert np.array_equal(a[k], b[k]), k


def test_callable_on_batch_dict_keeps_columns(tok):
    batch = {
        "query": np.array(["q1", "q2"], dtype=object),
        "ad_title": np.array(["t1", "t2"], dtype=object),
        "ad_description": np.array([None, "d"], dtype=object),
        "extra": np.array([1, 2]),
    }
    out = tok(batch)
    assert set(out) >= {"query", "extra", "input_ids", "attention_mask", "token_type_ids"}
    assert out["input_ids"].shape[0] == 2


def test_empty_batch_and_bad_args(tok, minilm_dir):
    assert tok.encode([], [])["input_ids"].shape == (0, 0)
    with pytest.raises(ValueError, match="2 queries but 1 ads"):
        tok.encode(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="max_length"):
        PairTokenizer(minilm_dir, max_length=4)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        PairTokenizer("/nonexistent/dir")
