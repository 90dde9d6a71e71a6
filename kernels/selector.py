"""Where a quantized layer's forward finds its kernel: the one dispatch point.

`QuantizedLinear.forward(x)` calls `select(layer, x)` and runs what it returns. A kernel is a
class with `supports(layer, x)` and `run(layer, x)`, registered under a name with a
priority; the highest-priority kernel that supports the layer, its device, layout and token
count wins. The torch path (dequantize, then `F.linear`) supports everything and is the
oracle the other kernels are tested against. `kernel_name(layer, x)` says which one a call
takes (records name the kernel that ran).

The Triton kernels register themselves from their modules (`KERNEL_MODULES`), imported on the
first lookup rather than here: this module is imported by the layer contract, long before
anyone runs a kernel, and importing Triton is neither free nor possible everywhere (no Triton
on macOS/Windows: those modules are then skipped and the torch path runs everything).
Priorities (docs/kernels.md): LUT 30 > VQ / scalar GEMV 20 > dequantize + matmul 10 > torch -1.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ttvq_bench.registry import Registry

KERNEL_MODULES = ("ttvq_kernels.vq_gemv", "ttvq_kernels.lut", "ttvq_kernels.scalar_gemv", "ttvq_kernels.dequant")


class Kernel:
    priority: int = 0  # higher wins among kernels that support a call

    @staticmethod
    def supports(layer, x: torch.Tensor) -> bool:
        return False

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _import_kernel_modules() -> None:
    for name in KERNEL_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != "triton" and not (e.name or "").startswith("triton."):
                raise


KERNELS: Registry[type[Kernel]] = Registry("kernel", Kernel, discover=_import_kernel_modules)


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


def kernel_name(layer, x: torch.Tensor) -> str:
    """The registered name of the kernel `layer(x)` runs."""
    k = select(layer, x)
    return next(name for name, obj in KERNELS.items() if obj is k)
