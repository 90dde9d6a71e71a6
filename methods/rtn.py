"""RTN: round-to-nearest uniform quantization, per row or per group. No calibration data used."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ttvq_methods.base import Method, check_ranges
from ttvq_methods.registry import METHODS
from ttvq_methods.scalar import ScalarQuantLinear, ScaleDType, rtn_quantize


@dataclass
class RTNConfig:
    name: str = "rtn"
    group_size: int = -1  # -1: one (scale, zero) per output row
    sym: bool = False
    scale_dtype: ScaleDType = ScaleDType.float16  # float32: the reference's (counted at 32 bits)


@METHODS.register("rtn")
class RTN(Method):
    # needs_calibration keeps the base default (True): RTN goes through the same block loop
    # as the other methods and simply ignores the data.
    Config = RTNConfig
    parallel_layers = True
    supported_bits = tuple(range(1, 9))

    def __init__(self, cfg, bits: int):
        super().__init__(cfg, bits)
        check_ranges(cfg, self.name, group_size="-1 or >= 1")

    @torch.no_grad()
    def quantize_layer(self, name: str, layer: nn.Linear, H: torch.Tensor | None) -> nn.Module:
        c = self.cfg
        codes, scales, zeros = rtn_quantize(layer.weight.data, self.bits, c.group_size, c.sym, str(c.scale_dtype))
        q = ScalarQuantLinear.from_codes(codes, scales, zeros, self.bits, c.group_size, c.sym, bias=layer.bias,
                                         scale_dtype=str(c.scale_dtype))
        return q.to(layer.weight.device)
