"""The floating dtypes a config may name (compute and storage), and their torch types."""
from __future__ import annotations

import torch

from ttvq_bench.choices import Choice


class DType(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


TORCH_DTYPES = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16, DType.float16: torch.float16}
