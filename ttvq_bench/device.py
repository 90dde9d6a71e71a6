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
