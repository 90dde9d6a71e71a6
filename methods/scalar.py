"""Uniform scalar quantization (RTN and GPTQ share it): the layer and the grid helpers.

Grid (GPTQ's `Quantizer`, bit for bit except that scales are rounded to fp16 first):
    maxq = 2^bits - 1,  q = clamp(round(w / scale) + zero, 0, maxq),  w ≈ scale * (q - zero)
Asymmetric: the row/group range [min(w, 0), max(w, 0)] is split into maxq steps and zero is an
integer in [0, maxq]. Symmetric: range ±max|w|, zero = (maxq + 1) / 2 (fixed, so not stored);
as in GPTQ the top code then reaches only (maxq - zero) * scale, one step short of +max|w|.

Scales are stored in fp16 (or fp32 with `scale_dtype`, counted at 32 bits), so they are rounded
to the stored dtype *before* codes and zeros are computed: the codes are then optimal for the
scale actually stored, and `dequantize()` reproduces exactly the values the quantizer produced.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ttvq_bench.choices import Choice
from ttvq_bench.errors import QuantizationError
from ttvq_methods.layers import QuantizedLinear
from ttvq_methods.packing import pack, packed_nbytes, unpack
from ttvq_methods.registry import LAYERS

# Smallest positive fp16 (subnormal). Clamping here keeps a near-zero row's scale > 0 after
# the fp16 round; such a row quantizes to ~0, which is what it is.
_MIN_SCALE = 2.0**-24


def n_groups_for(in_features: int, group_size: int) -> int:
    if group_size == -1 or group_size >= in_features:
        return 1
    if group_size < 1:
        raise ValueError(f"group_size must be -1 or >= 1, got {group_size}")
    return math.ceil(in_features / group_size)


SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def quant_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype: str = "float16") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of w (rows, cols) as fp32 vectors; scale is exact in `scale_dtype`."""
    maxq = 2**bits - 1
    w = w.float()
    zero_ = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(1).values, zero_)  # the grid always contains 0 exactly
    xmax = torch.maximum(w.max(1).values, zero_)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)  # all-zero row: any grid works, GPTQ uses [-1, 1]
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp_min(_MIN_SCALE).to(SCALE_DTYPES[scale_dtype]).float()
    if not torch.isfinite(scale).all():
        raise QuantizationError("weights are NaN/Inf or too large for fp16 scales")
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        # clamp: the fp16 round of scale can push -xmin/scale a hair past maxq
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (float tensor, exact integers) of w; scale/zero are per row of w.

    w may be (rows,) (one column, as GPTQ calls it) or (rows, cols) with scale/zero (rows,).
    """
    if w.dim() == scale.dim() + 1:
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: str = "float16"):
    """Round-to-nearest: (codes (m, k), scales (m, G), zeros (m, G)), columns grouped in order."""
    W = W.float()
    m, k = W.shape
    G = n_groups_for(k, group_size)
    gs = k if G == 1 else group_size
    codes = torch.empty_like(W)
    scales = torch.empty(m, G, device=W.device)
    zeros = torch.empty(m, G, device=W.device)
    for g in range(G):
        cols = slice(g * gs, min((g + 1) * gs, k))  # the last group may be shorter
        scales[:, g], zeros[:, g] = quant_params(W[:, cols], bits, sym, scale_dtype)
        codes[:, cols] = quantize_to_codes(W[:, cols], scales[:, g], zeros[:, g], bits)
    return codes, scales, zeros


class ScaleDType(Choice):
    float16 = "float16"
    float32 = "float32"  # the GPTQ reference's scales (counted at 32 bits)


@LAYERS.register("scalar")
class ScalarQuantLinear(QuantizedLinear):
    """Buffers: codes (packed, bits each), scales fp16 or fp32 (out, G), zeros (packed, bits each; absent
    when symmetric), g_idx (packed, ceil(log2 G) bits; only when act_order changed which group a
    column belongs to, otherwise column j is in group j // group_size), bias fp16 (optional)."""

    kind = "scalar"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1,
                 sym: bool = False, has_g_idx: bool = False, has_bias: bool = False, scale_dtype: str = "float16"):
        super().__init__(in_features, out_features, has_bias)
        if not 1 <= bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {bits}")
        self.bits, self.group_size, self.sym, self.has_g_idx = bits, group_size, sym, has_g_idx
        self.scale_dtype = str(scale_dtype)
        self.n_groups = n_groups_for(in_features, group_size)
        m, k, G = out_features, in_features, self.n_groups
        u8 = dict(dtype=torch.uint8)
        self.register_buffer("codes", torch.zeros(packed_nbytes(m * k, bits), **u8))
        self.register_buffer("scales", torch.zeros(m, G, dtype=SCALE_DTYPES[self.scale_dtype]))
        if not sym:
            self.register_buffer("zeros", torch.zeros(packed_nbytes(m * G, bits), **u8))
        if has_g_idx:
            self.register_buffer("g_idx", torch.zeros(packed_nbytes(k, self.g_idx_bits), **u8))
        if has_bias:
            self.register_buffer("bias", torch.zeros(m, dtype=torch.float16))

    @property
    def g_idx_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.n_groups)))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, sym: bool, g_idx: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, scale_dtype: str = "float16") -> "ScalarQuantLinear":
        """Pack integer codes (m, k), per-group scales/zeros (m, G) and optional column->group
        map g_idx (k,). g_idx equal to the default j // group_size is not stored."""
        m, k = codes.shape
        G = n_groups_for(k, group_size)
        if scales.shape != (m, G) or zeros.shape != (m, G):
            raise ValueError(f"scales/zeros must be {(m, G)}, got {tuple(scales.shape)}/{tuple(zeros.shape)}")
        if g_idx is not None and torch.equal(g_idx.cpu().long(), cls._default_g_idx(k, group_size, G)):
            g_idx = None
        layer = cls(k, m, bits, group_size, sym, has_g_idx=g_idx is not None, has_bias=bias is not None,
                    scale_dtype=scale_dtype)
        layer.codes.copy_(pack(codes, bits))
        layer.scales.copy_(scales)  # exact in the stored dtype already: no rounding here
        if not sym:
            layer.zeros.copy_(pack(zeros, bits))
        if g_idx is not None:
            layer.g_idx.copy_(pack(g_idx, layer.g_idx_bits))
        if bias is not None:
            layer.bias.copy_(bias.detach().half())
        return layer

    @staticmethod
    def _default_g_idx(k: int, group_size: int, G: int) -> torch.Tensor:
        return torch.zeros(k, dtype=torch.long) if G == 1 else torch.arange(k) // group_size

    def column_groups(self) -> torch.Tensor:
        k, G = self.in_features, self.n_groups
        if self.has_g_idx:
            return unpack(self.g_idx, self.g_idx_bits, k)
        return self._default_g_idx(k, self.group_size, G)

    def dequantize(self) -> torch.Tensor:
        m, k, G, dev = self.out_features, self.in_features, self.n_groups, self.scales.device
        q = unpack(self.codes, self.bits, m * k).view(m, k).to(dev, torch.float32)
        if self.sym:
            zeros = torch.full((m, G), (2**self.bits) / 2, device=dev)  # (maxq + 1) / 2
        else:
            zeros = unpack(self.zeros, self.bits, m * G).view(m, G).to(dev, torch.float32)
        gi = self.column_groups().to(dev)
        # Same fp32 expression as the quantizer: scale * (q - zero), both factors exact.
        return self.scales.float()[:, gi] * (q - zeros[:, gi])

    def meta(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, bits=self.bits,
                    group_size=self.group_size, sym=self.sym, has_g_idx=self.has_g_idx,
                    has_bias=self.has_bias, scale_dtype=self.scale_dtype)
