"""Where a job computes: `device` (auto | cpu | cuda | cuda:N; auto = CUDA when available) and
the compute dtype `model.dtype` (auto = bf16 on a GPU that supports it, else fp16 there, fp32 on
a CPU). The model lives in host memory; quantization moves one decoder block at a time to the
device (methods/blockwise.py) and evaluation moves the model there."""
from __future__ import annotations

import re

import torch

from ttvq_bench.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"device={name!r} is not auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device={name} but no such CUDA device is visible (torch sees {torch.cuda.device_count()})")
    return dev


def resolve_dtype(name: str, device: torch.device) -> str:
    """The compute dtype's name for `model.dtype` on `device`."""
    if str(name) != "auto":
        return str(name)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def resolve_autocast(name: str, device: torch.device) -> str:
    """`autocast` for the distillation stages on `device`: bf16 or off."""
    name = str(name)
    if name not in ("auto", "off", "bf16"):
        raise ConfigError(f"autocast={name!r} is not auto, off or bf16")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return name


def batch_size_for(model: torch.nn.Module, seqlen: int, device: torch.device, setting: int | None,
                   n_items: int | None = None) -> int:
    """`setting` when set; else (null) from free memory: on a GPU, half of what is free over a
    window's peak inference bytes (fp32 logits and their log-softmax, the hidden states of one
    layer, eager attention scores), at most 256 and at most `n_items`. On a CPU 8: host memory
    is not what limits a batch there, and larger batches do not compute faster."""
    if setting is not None:
        return int(setting)
    bs = 8
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        c = model.config
        item = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
        per_window = (3 * 4 * c.vocab_size * seqlen + 16 * item * c.hidden_size * seqlen
                      + 2 * item * c.num_attention_heads * seqlen * seqlen)
        bs = max(1, min(256, int(free * 0.5 // per_window)))
    return max(1, min(bs, n_items)) if n_items else bs
