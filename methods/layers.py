"""The quantized linear layer contract every method's layer follows.

A quantized layer stores only what inference needs, as registered buffers (so `state_dict()`
is exactly the stored representation), and answers:
  dequantize()   -> the (out, in) fp32 weight it represents
  forward(x)     -> x @ dequantize().T + bias   (plain torch path; kernels add fused paths)
  stored_bits()  -> every stored bit: the sum over its persistent buffers, nothing else
  meta()         -> JSON-able constructor arguments, so a checkpoint can rebuild the layer
The record's bpw is computed from `stored_bits()` alone, never from a formula beside it.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class QuantizedLinear(nn.Module):
    kind: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, has_bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = has_bias
        self._w_cache: torch.Tensor | None = None
        # Loading new buffers invalidates the cached dequantized weight.
        self._register_load_state_dict_pre_hook(lambda *a, **k: self.clear_cache())

    # -- to implement -------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "QuantizedLinear":  # pragma: no cover - abstract
        """An instance with correctly shaped (empty) buffers, ready for load_state_dict."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def n_weights(self) -> int:
        return self.in_features * self.out_features

    def stored_bits(self) -> int:
        return sum(b.numel() * b.element_size() * 8 for b in self.state_dict().values())

    def bpw(self) -> float:
        return self.stored_bits() / self.n_weights

    def clear_cache(self) -> None:
        self._w_cache = None

    def weight_for_forward(self) -> torch.Tensor:
        # Dequantizing packed codes on every call would dominate evaluation time; the cache is
        # not a buffer, so it is never saved and never counted.
        if self._w_cache is None or self.training:
            w = self.dequantize()
            if self.training:
                return w
            self._w_cache = w
        return self._w_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_for_forward().to(x.dtype)
        bias = getattr(self, "bias", None) if self.has_bias else None
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, kind={self.kind}, bpw={self.bpw():.3f}"
