"""Where a quantized layer's forward finds its kernel: the one dispatch point.

`QuantizedLinear.forward(x)` calls `select(layer, x)` and runs what it returns. A kernel is a
class with `supports(layer, x)` and `run(layer, x)`, registered under a name with a
priority; the highest-priority kernel that supports the layer, its device, layout and token
count wins. The torch path (dequantize, then `F.linear`) supports everything and is the
oracle the other kernels are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ttvq_bench.registry import Registry


class Kernel:
    priority: int = 0  # higher wins among kernels that support a call

    @staticmethod
    def supports(layer, x: torch.Tensor) -> bool:
        return False

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


KERNELS: Registry[type[Kernel]] = Registry("kernel", Kernel)


@KERNELS.register("torch")
class TorchDequant(Kernel):
    """Dequantize (cached by the layer in eval mode), then a dense matmul."""

    priority = -1

    @staticmethod
    def supports(layer, x: torch.Tensor) -> bool:
        return True

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        w = layer.weight_for_forward().to(x.dtype)
        bias = layer.bias_for_forward()
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def select(layer, x: torch.Tensor) -> type[Kernel]:
    best = None
    for _, k in KERNELS.items():
        if (best is None or k.priority > best.priority) and k.supports(layer, x):
            best = k
    return best
