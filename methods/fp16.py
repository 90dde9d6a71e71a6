"""FP16: the unquantized baseline."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ttvq_methods.base import Method
from ttvq_methods.registry import METHODS


@dataclass
class FP16Config:
    name: str = "fp16"


@METHODS.register("fp16")
class FP16(Method):
    """The baseline keeps every weight; its bpw is counted at 16 bits per weight, as stored in
    the fp16 checkpoint (the `bits` argument does not change that)."""

    Config = FP16Config
    needs_calibration = False  # no block loop at all
    fixed_bits = 16

    def quantize_layer(self, name: str, layer: nn.Linear, H: torch.Tensor | None) -> None:
        return None
