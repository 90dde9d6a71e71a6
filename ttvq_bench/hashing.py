"""Content hashes: every cache key and run_id is built from these."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch


def _default(o: Any):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"cannot hash {type(o).__name__}")


def hash_obj(obj: Any, n: int = 16) -> str:
    """Hash of a JSON-able object, independent of dict key order."""
    s = json.dumps(obj, sort_keys=True, default=_default, separators=(",", ":"))
    return hashlib.sha256(s.encode()).hexdigest()[:n]


def hash_tensors(named: Iterable[tuple[str, torch.Tensor]], n: int = 16) -> str:
    """Hash of tensors' names, dtypes, shapes and bytes (exact content)."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:n]


def hash_file(path: str | Path, n: int = 16, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()[:n]


def hash_bytes(b: bytes, n: int = 16) -> str:
    return hashlib.sha256(b).hexdigest()[:n]
