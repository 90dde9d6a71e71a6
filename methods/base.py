"""Method base class: what the block-wise loop calls.

A method gets the top-level `bits` and its own config dataclass. The loop calls
`quantize_layer` for each linear of each block (with that layer's input Hessian when
`needs_hessian`), then `finetune_block` (a no-op unless the method trains), and after the
last block `finalize` (end-to-end stages). Methods never touch model-specific code.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ttvq_bench.errors import ConfigError


class Method:
    name: ClassVar[str]
    Config: ClassVar[type]
    needs_calibration: ClassVar[bool] = True  # False: no block loop at all (fp16)
    needs_hessian: ClassVar[bool] = True
    supported_bits: ClassVar[tuple[int, ...]] = ()  # empty: any bits in 1..16
    # A method whose result does not depend on `bits` (fp16) names the width it really has;
    # the run records that, so a sweep over bits runs it once (same run_id) instead of N times.
    fixed_bits: ClassVar[int | None] = None

    def __init__(self, cfg: Any, bits: int):
        if self.supported_bits and bits not in self.supported_bits:
            raise ConfigError(f"method {self.name!r} cannot do bits={bits}; it supports {list(self.supported_bits)}")
        self.cfg = cfg
        self.bits = bits

    def quantize_layer(self, name: str, layer: nn.Linear, H: torch.Tensor | None) -> nn.Module | None:
        """Return the quantized replacement of `layer` (None: keep it as is)."""
        raise NotImplementedError

    def finetune_block(self, block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, layer_kwargs: dict) -> None:
        """Optional block-wise training against the full-precision block outputs."""

    def finalize(self, model: nn.Module, calib_ids: torch.Tensor) -> None:
        """Optional end-to-end stage after every block is quantized."""
