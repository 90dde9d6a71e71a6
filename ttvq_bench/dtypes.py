"""The floating dtypes a config may name (compute and storage), and their torch types."""
from __future__ import annotations

import torch

from ttvq_bench.choices import Choice


class DType(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ComputeDType(Choice):
    auto = "auto"  # bf16 on a GPU that has it, else fp16 there; fp32 on a CPU (ttvq_bench/device.py)
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
