"""Quantized checkpoints: safetensors holding exactly the stored representation.

Quantized layers contribute their buffers (packed codes, codebooks, scales); every other
floating tensor is written at the storage dtype (fp16 by default); tied tensors are written
once. The safetensors metadata (`ttvq` key, JSON) lists each quantized layer's kind and
constructor meta, so loading rebuilds the same modules on a freshly loaded base model and
reproduces the quantized model bit-exactly, without re-quantizing. A layer kind whose stored
form changed maps older files onto today's layer (`QuantizedLinear.upgrade`), so checkpoints
keep loading across versions.

Integrity: the metadata holds `content_sha`, a hash of every tensor's name, dtype, shape and
bytes, written at creation and checked on every load, so a damaged file is an error (one
line), never a model that quietly computes something else. Files written before the hash
existed load unchecked.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ttvq_bench.dtypes import TORCH_DTYPES
from ttvq_bench.errors import DataError
from ttvq_bench.faults import fault_point
from ttvq_bench.hashing import hash_tensors
from ttvq_bench.record.cache import tmp_prefix
from ttvq_methods.layers import QuantizedLinear
from ttvq_methods.model_walk import modules_of, set_module
from ttvq_methods.registry import LAYERS


def quantized_layers(module: nn.Module) -> dict[str, QuantizedLinear]:
    return modules_of(module, QuantizedLinear)


def _dedupe(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            out[k] = t
    return out, aliases


def save_module_state(module: nn.Module, path: str | Path, storage_dtype: str | None = "float16",
                      extra: dict | None = None) -> str:
    """Write `module`'s state atomically (temporary name, then rename); returns the content hash.
    Unquantized floating tensors are cast to `storage_dtype` (None: kept exactly as they are,
    e.g. resume state)."""
    qlayers = quantized_layers(module)
    prefixes = tuple(f"{n}." for n in qlayers)
    sd, aliases = _dedupe(module.state_dict())
    tensors = {}
    for k, t in sd.items():
        t = t.detach().cpu()
        if storage_dtype is not None and not k.startswith(prefixes) and t.is_floating_point():
            t = t.to(TORCH_DTYPES[storage_dtype])
        tensors[k] = t.contiguous()
    meta = {
        "layers": {n: {"kind": m.kind, "meta": m.meta()} for n, m in qlayers.items()},
        "aliases": aliases,
        "storage_dtype": storage_dtype,
        "content_sha": hash_tensors(sorted(tensors.items()), n=32),
        "extra": extra or {},
    }
    path = Path(path)
    tmp = path.with_name(f"{tmp_prefix(path.name)}x")
    save_file(tensors, str(tmp), metadata={"ttvq": json.dumps(meta)})
    fault_point(f"write:{path.name}")
    os.replace(tmp, path)
    return meta["content_sha"]


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata; a missing, unreadable or foreign file is one DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"checkpoint {p}: file not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            return json.loads((f.metadata() or {})["ttvq"])
    except KeyError:
        raise DataError(f"checkpoint {p}: not a ttvq-bench checkpoint (no 'ttvq' metadata)") from None
    except Exception as e:  # safetensors' header errors, truncated files, bad JSON
        raise DataError(f"checkpoint {p}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_tensors(path: str | Path, meta: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the file, checked against the metadata's content hash."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DataError(f"checkpoint {path}: unreadable tensors ({type(e).__name__}); the file is damaged") from None
    expected = meta.get("content_sha")
    if expected is not None and hash_tensors(sorted(tensors.items()), n=len(expected)) != expected:
        raise DataError(f"checkpoint {path}: corrupt (its tensors do not match the content hash written with them)")
    return tensors


def load_module_state(module: nn.Module, path: str | Path) -> dict:
    """Rebuild the quantized layers listed in the file and load every tensor (strict), after
    checking the file's integrity; a file that does not fit `module` is one DataError."""
    meta = read_meta(path)
    tensors = read_tensors(path, meta)
    renamed: dict[str, str] = {}  # full key in the file -> full key today
    try:
        for name, spec in meta["layers"].items():
            cls = LAYERS.get(spec["kind"])
            layer_meta, renames = cls.upgrade(spec["kind"], spec["meta"])
            set_module(module, name, cls.from_meta(layer_meta))
            renamed.update({f"{name}.{old}": f"{name}.{new}" for old, new in renames.items()})
        sd = {renamed.get(k, k): t for k, t in tensors.items()}
        aliases = {renamed.get(a, a): renamed.get(t, t) for a, t in meta["aliases"].items()}
        for alias, target in aliases.items():
            sd[alias] = sd[target]
        module.load_state_dict(sd, strict=True)  # copies into existing params: casts to their dtype
    except (AttributeError, RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"checkpoint {path} does not fit this model ({first[:300]})") from None
    _retie_buffers(module, aliases)
    return meta["extra"]


def _retie_buffers(module: nn.Module, aliases: dict[str, str]) -> None:
    """A buffer written once for several owners (a VQ codebook shared by layers) becomes one
    tensor again, so the loaded model stores and counts it once, like the model that was saved.
    Tied parameters are left to the model's own tying."""
    for alias, target in aliases.items():
        a_mod, _, a_name = alias.rpartition(".")
        t_mod, _, t_name = target.rpartition(".")
        am, tm = module.get_submodule(a_mod), module.get_submodule(t_mod)
        if a_name in am._buffers and t_name in tm._buffers:
            am._buffers[a_name] = tm._buffers[t_name]


def round_to_storage(module: nn.Module, storage_dtype: str) -> None:
    """Round every unquantized floating parameter to the storage dtype (kept in compute dtype),
    so what is evaluated is exactly what a checkpoint stores."""
    qparams = {id(p) for m in quantized_layers(module).values() for p in m.parameters()}
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in qparams and p.is_floating_point():
                p.copy_(p.to(TORCH_DTYPES[storage_dtype]).to(p.dtype))
