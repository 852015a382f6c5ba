"""A tiny random BERT (2 layers, hidden 32) with the default encoder's real tokenizer.

For tests, CI-sized runs and benchmarks at toy size: same code paths, seconds instead of minutes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from models.encoder import DEFAULT_ENCODER, tokenizer_dir


def make_tiny_encoder(
    out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2
) -> Path:
    """Write a random BertModel + tokenizer files to `out_dir` (a loadable encoder folder)."""
    import torch
    from transformers import BertConfig, BertModel

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(out)
    src = tokenizer_dir(DEFAULT_ENCODER)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return out
