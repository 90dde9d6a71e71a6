"""The quantized linear layer contract every method's layer follows.

A quantized layer stores only what inference needs, as registered buffers (so `state_dict()`
is exactly the stored representation), and answers:
  dequantize()   -> the (out, in) fp32 weight it represents
  forward(x)     -> through the kernel the selector picks (ttvq_kernels.selector); the torch
                    path computes x @ dequantize().T + bias
  stored_bits()  -> every stored bit: the sum over its persistent buffers, nothing else
  meta()         -> JSON-able constructor arguments, so a checkpoint can rebuild the layer
  upgrade()      -> how a checkpoint written by older code maps onto today's layer
The record's bpw is computed from `stored_bits()` alone, never from a formula beside it.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ttvq_kernels.selector import select


class QuantizedLinear(nn.Module):
    kind: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, has_bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = has_bias
        self._w_cache: torch.Tensor | None = None
        # Loading new buffers invalidates the cached dequantized weight.
        # (a method, not a lambda: a layer quantized on one torchrun process is pickled to the others)
        self._register_load_state_dict_pre_hook(self._state_loading)

    def _state_loading(self, *args, **kwargs) -> None:
        self.clear_cache()

    # -- to implement -------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "QuantizedLinear":
        """An instance with correctly shaped (empty) buffers, ready for load_state_dict."""
        return cls(**meta)

    @classmethod
    def upgrade(cls, kind: str, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """(today's meta, {old buffer name: new name}) for a layer a checkpoint stored as
        `kind` with `meta`. Identity unless a layer's stored form changed."""
        return meta, {}

    # -- shared -------------------------------------------------------------------------------
    @property
    def n_weights(self) -> int:
        return self.in_features * self.out_features

    @property
    def n_params(self) -> int:
        """The model parameters this layer stands for (bpw_model's denominator): its weights and
        bias. A layer standing for weights the model still holds elsewhere (an output head that
        was tied to the input embedding) overrides this."""
        return self.n_weights + (self.out_features if self.has_bias else 0)

    def stored_bits(self) -> int:
        return sum(b.numel() * b.element_size() * 8 for b in self.state_dict().values())

    def bpw(self) -> float:
        return self.stored_bits() / self.n_weights

    def clear_cache(self) -> None:
        self._w_cache = None

    @torch.no_grad()
    def rel_err(self, ref: torch.Tensor) -> float:
        """||Ŵ - ref|| / ||ref||, e.g. against the full-precision weight."""
        ref = ref.detach().float()
        return float((self.dequantize() - ref).norm() / ref.norm().clamp_min(1e-12))

    def weight_for_forward(self) -> torch.Tensor:
        # Dequantizing packed codes on every call would dominate evaluation time; the cache is
        # not a buffer, so it is never saved and never counted. A layer that holds parameters
        # is being trained (its stored form has buffers only): every call rebuilds its weight.
        if self.training or next(self.parameters(), None) is not None:
            return self.dequantize()
        if self._w_cache is None:
            self._w_cache = self.dequantize()
        return self._w_cache

    def bias_for_forward(self) -> torch.Tensor | None:
        return getattr(self, "bias", None) if self.has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select(self, x).run(self, x)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, kind={self.kind}, bpw={self.bpw():.3f}"
