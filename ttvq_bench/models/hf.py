"""Load a local Hugging Face causal LM (Llama, Mistral, Qwen2, ... families).

`path` is a model directory, or a hub repo id already in the local Hugging Face cache.
Nothing is downloaded: every call is made with local_files_only=True and HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

from ttvq_bench.errors import DataError
from ttvq_bench.models.base import LoadedModel
from ttvq_bench.models.tokenizers import HFTokenizer

_EDGE = 1 << 20  # bytes hashed at each end of a weight file


@contextlib.contextmanager
def _offline():
    """HF_HUB_OFFLINE=1 for the duration of the call, restoring the caller's value after."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _resolve(path) -> tuple[Path, str | None]:
    """(local directory, repo id or None). A path that is not a directory is looked up as a
    repo id in the local cache only."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p, None
    try:
        from huggingface_hub import snapshot_download

        with _offline():
            return Path(snapshot_download(str(path), local_files_only=True)), str(path)
    except Exception:  # not a valid repo id, or not cached: both mean "not found" here
        raise DataError(
            f"model not found: {path} is neither a local directory nor a repo in the local Hugging Face cache"
        ) from None


def weights_fingerprint(model_dir: Path, n: int = 16) -> str:
    """A fingerprint (NOT a full content hash) of a model directory: sha256 over config.json's
    bytes and, for each *.safetensors / *.bin file, its name, its size and the sha256 of its
    first and last 1 MiB. Hashing every byte of a 14 GB checkpoint takes minutes; this takes
    milliseconds and still changes when a file is replaced, resized or re-exported (headers,
    tensor order and the first/last tensors differ). An edit confined to the middle of a file
    larger than 2 MiB would go unnoticed.
    """
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    files = sorted(f for pat in ("*.safetensors", "*.bin") for f in model_dir.glob(pat))
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(_EDGE)
            fh.seek(max(0, size - _EDGE))
            tail = fh.read(_EDGE)
        h.update(f"|{f.name}|{size}|".encode())
        h.update(hashlib.sha256(head).digest() + hashlib.sha256(tail).digest())
    return h.hexdigest()[:n]


def load_hf(path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, repo_id = _resolve(path)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    with _offline():
        try:
            config = AutoConfig.from_pretrained(model_dir, **kw)
            # tokenizer before weights: a missing tokenizer should not cost a 14 GB load first
            tok = AutoTokenizer.from_pretrained(model_dir, **kw)
            model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype, **kw)
        except Exception as e:
            # Missing or damaged weight or tokenizer files, unknown architectures: a user-input problem.
            msg = " ".join(str(e).split())[:300] or type(e).__name__  # one line
            raise DataError(f"cannot load Hugging Face model from {model_dir}: {msg}") from None

    # The harness walks `model.model.layers` block by block (calibration, quantization).
    if not isinstance(getattr(getattr(model, "model", None), "layers", None), torch.nn.ModuleList):
        raise DataError(
            f"{model_dir}: {type(model).__name__} has no model.model.layers; only decoder-only "
            "models laid out like Llama/Mistral/Qwen2 are supported"
        )
    model.eval()
    tokenizer = HFTokenizer(tok)
    fp = hashlib.sha256(f"{weights_fingerprint(model_dir)}|{tokenizer.fingerprint()}".encode()).hexdigest()[:16]
    name = repo_id.split("/")[-1] if repo_id else model_dir.resolve().name
    info = {
        "format": "hf",
        "path": str(model_dir),
        "n_params": sum(t.numel() for t in model.parameters()),
        "model_type": config.model_type,
    }
    if repo_id:
        info["repo_id"] = repo_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, fingerprint=fp, info=info)
