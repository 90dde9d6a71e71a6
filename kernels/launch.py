"""How a layer's call reaches a Triton kernel: which calls a kernel may take, the tokens as one
(T, in) matrix, the fp32 accumulator every kernel adds into, and the torch epilogue (LoRA).

Every Triton kernel class derives from `TritonKernel`; the conditions it adds to a kernel's own
`fits(layer, n_tokens)` are the ones no Triton kernel can get around:
  * the device: a CUDA tensor, or a CPU tensor inside `device.cpu_interpreter()`;
  * the stored form only: a layer in trainable mode (or holding parameters) changes under
    training and its codes are not packed; and kernels have no backward, so an input that
    needs a gradient goes to the torch path;
  * fp32/fp16/bf16 activations on the layer's device, fewer than 2^31 weights (int32 offsets).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ttvq_kernels.device import launchable
from ttvq_kernels.selector import Kernel

MAX_DECODE_TOKENS = 16  # GEMV kernels take 1..16 tokens; more is prefill (dequantize + matmul)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def n_tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def stored_form(layer, x: torch.Tensor) -> bool:
    """The layer is in its stored form and the call needs no gradient."""
    if getattr(layer, "trainable", False) or next(layer.parameters(), None) is not None:
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)


class TritonKernel(Kernel):
    kinds: tuple[str, ...] = ()  # layer kinds this kernel reads

    @classmethod
    def fits(cls, layer, tokens: int) -> bool:  # layout and token count; refined per kernel
        return True

    @classmethod
    def supports(cls, layer, x: torch.Tensor) -> bool:
        # cheapest first: this runs on every forward of every quantized layer
        if getattr(layer, "kind", None) not in cls.kinds or x.dtype not in DTYPES or not launchable(x):
            return False
        if x.dim() == 0 or x.shape[-1] != layer.in_features or layer.n_weights >= 2**31:
            return False
        buf = next(layer.buffers(), None)
        if buf is None or buf.device != x.device:
            return False
        return stored_form(layer, x) and n_tokens(x) > 0 and cls.fits(layer, n_tokens(x))


class DecodeKernel(TritonKernel):
    """A GEMV: 1..MAX_DECODE_TOKENS tokens (more is prefill: dequantize + matmul)."""

    @classmethod
    def fits(cls, layer, tokens: int) -> bool:
        return tokens <= MAX_DECODE_TOKENS


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) -> a contiguous (T, in) view or copy."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def accumulator(x2: torch.Tensor, out_features: int) -> torch.Tensor:
    """The fp32 (T, out) buffer kernels add their partial sums into (atomically)."""
    return torch.zeros(x2.shape[0], out_features, device=x2.device, dtype=torch.float32)


def finish(layer, x: torch.Tensor, x2: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """acc (T, out) fp32 -> y (..., out) in x's dtype, plus the LoRA term if the layer has one
    (two thin matmuls; not fused)."""
    y = acc.to(x.dtype)
    if getattr(layer, "lora_rank", 0):
        y = y + F.linear(F.linear(x2, layer.lora_A.to(x.dtype)), layer.lora_B.to(x.dtype))
    return y.reshape(*x.shape[:-1], layer.out_features)


def grid_split(n_programs: int, n_steps: int, device: torch.device) -> int:
    """How many ways to split the reduction (split-K) so a GPU has enough programs: aim at four
    per multiprocessor, never more splits than loop steps. One in the interpreter, where every
    program costs time and there is no parallelism to win."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_steps, -(-4 * sms // max(1, n_programs))))
