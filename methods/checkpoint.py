"""Quantized checkpoints: safetensors holding exactly the stored representation.

Quantized layers contribute their buffers (packed codes, codebooks, scales); every other
floating tensor is written at the storage dtype (fp16 by default); tied tensors are written
once. The safetensors metadata (`ttvq` key, JSON) lists each quantized layer's kind and
constructor meta, so loading rebuilds the same modules on a freshly loaded base model and
reproduces the quantized model bit-exactly, without re-quantizing. A layer kind whose stored
form changed maps older files onto today's layer (`QuantizedLinear.upgrade`), so checkpoints
keep loading across versions.
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


def save_module_state(module: nn.Module, path: str | Path, storage_dtype: str = "float16", extra: dict | None = None) -> None:
    """Write `module`'s state atomically (temporary name, then rename)."""
    qlayers = quantized_layers(module)
    prefixes = tuple(f"{n}." for n in qlayers)
    sd, aliases = _dedupe(module.state_dict())
    tensors = {}
    for k, t in sd.items():
        t = t.detach().cpu()
        if not k.startswith(prefixes) and t.is_floating_point():
            t = t.to(TORCH_DTYPES[storage_dtype])
        tensors[k] = t.contiguous()
    meta = {
        "layers": {n: {"kind": m.kind, "meta": m.meta()} for n, m in qlayers.items()},
        "aliases": aliases,
        "storage_dtype": storage_dtype,
        "extra": extra or {},
    }
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp), metadata={"ttvq": json.dumps(meta)})
    os.replace(tmp, path)


def read_meta(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["ttvq"])


def load_module_state(module: nn.Module, path: str | Path) -> dict:
    """Rebuild the quantized layers listed in the file and load every tensor (strict)."""
    meta = read_meta(path)
    renamed: dict[str, str] = {}  # full key in the file -> full key today
    for name, spec in meta["layers"].items():
        cls = LAYERS.get(spec["kind"])
        layer_meta, renames = cls.upgrade(spec["kind"], spec["meta"])
        set_module(module, name, cls.from_meta(layer_meta))
        renamed.update({f"{name}.{old}": f"{name}.{new}" for old, new in renames.items()})
    sd = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            sd[renamed.get(k, k)] = f.get_tensor(k)
    aliases = {renamed.get(a, a): renamed.get(t, t) for a, t in meta["aliases"].items()}
    for alias, target in aliases.items():
        sd[alias] = sd[target]
    module.load_state_dict(sd, strict=True)  # copies into existing params: casts to their dtype
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
