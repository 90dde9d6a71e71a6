"""Prefill (more than 16 tokens): dequantize with a Triton kernel into a scratch weight in the
activations' dtype, then one dense matmul (cuBLAS on a GPU), where the matmul's compute
dwarfs the decode. The scratch weight lives for one call: unlike the torch path's cache
(`QuantizedLinear.weight_for_forward`), no dense copy of the model stays in memory.

VQ: one launch per pass of `layout.vq_passes`; a program decodes a (lines x entries) tile with
`tiles.vq_tile`, applies the line's norm scale and bias, and writes it at its place (a line is
a column of W for orientation "out", a row for "in"). Scalar: (rows x columns) tiles with
`tiles.scalar_tile`. The values are bit-identical to `dequantize()` (same fp32 expressions,
same order of the M codebooks' sum).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ttvq_kernels.launch import TritonKernel, as_tokens, finish
from ttvq_kernels.layout import scalar_layout, vq_passes
from ttvq_kernels.selector import KERNELS
from ttvq_kernels.tiles import scalar_tile, vq_tile


def blocks() -> tuple[int, int]:
    """(lines or rows, entries or columns) per tile: a guess for a GPU, not tuned."""
    return (32, 128)


@triton.jit
def _vq_dequant(w_ptr, book_ptr, codes_ptr, map_ptr, scale_ptr, nbias_ptr, n_lines, line_len, row_stride,
                k_stride, line_step, entry_step, D: tl.constexpr, M: tl.constexpr, WIDTH: tl.constexpr,
                DENSE: tl.constexpr, HAS_NB: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr):
    lines = tl.program_id(0) * BL + tl.arange(0, BL)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    l_mask = lines < n_lines
    mask = l_mask[:, None] & (e < line_len)[None, :]
    v = vq_tile(book_ptr, codes_ptr, lines[:, None], e[None, :], mask, n_lines, row_stride, k_stride, line_len,
                D, M, WIDTH, DENSE)
    v = v * tl.load(scale_ptr + lines, mask=l_mask, other=0.0)[:, None]
    if HAS_NB:
        v += tl.load(nbias_ptr + lines, mask=l_mask, other=0.0)[:, None]
    where = tl.load(map_ptr + lines, mask=l_mask, other=0)
    tl.store(w_ptr + where[:, None] * line_step + e[None, :] * entry_step, v, mask=mask)


@triton.jit
def _scalar_dequant(w_ptr, codes_ptr, zeros_ptr, scales_ptr, groups_ptr, out_f, in_f, row_stride, zero_stride,
                    n_groups, zero_const, WIDTH: tl.constexpr, HAS_ZEROS: tl.constexpr,
                    BO: tl.constexpr, BI: tl.constexpr):
    rows = tl.program_id(0) * BO + tl.arange(0, BO)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    mask = (rows < out_f)[:, None] & (cols < in_f)[None, :]
    w = scalar_tile(codes_ptr, zeros_ptr, scales_ptr, groups_ptr, rows[:, None], cols[None, :], mask, row_stride,
                    zero_stride, n_groups, zero_const, WIDTH, HAS_ZEROS)
    tl.store(w_ptr + rows[:, None] * in_f + cols[None, :], w, mask=mask)


def dequantize(layer, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ (out, in) in `dtype`, without the LoRA term (the matmul path adds it separately);
    written into `out` when given (tests poison it to catch unwritten elements)."""
    B1, B2 = blocks()
    w = out if out is not None else torch.empty(layer.out_features, layer.in_features, dtype=dtype,
                                                device=next(layer.buffers()).device)
    if layer.kind == "scalar":
        lay = scalar_layout(layer)
        zeros = lay.codes if lay.zeros is None else lay.zeros
        _scalar_dequant[(triton.cdiv(layer.out_features, B1), triton.cdiv(layer.in_features, B2))](
            w, lay.codes, zeros, layer.scales, lay.groups, layer.out_features, layer.in_features,
            lay.codes.shape[1], zeros.shape[1], layer.n_groups, lay.zero_const,
            WIDTH=lay.width, HAS_ZEROS=lay.zeros is not None, BO=B1, BI=B2)
        return w
    # a line is a column of W ("out": consecutive entries one row apart) or a row ("in")
    line_step, entry_step = (1, layer.in_features) if layer.orientation == "out" else (layer.in_features, 1)
    for p in vq_passes(layer):
        _vq_dequant[(triton.cdiv(p.n, B1), triton.cdiv(layer.line_len, B2))](
            w, p.codebook, p.scale if p.dense else p.codes, p.line_map, p.scale,
            p.scale if p.nbias is None else p.nbias, p.n, layer.line_len, p.row_stride, p.k_stride,
            line_step, entry_step, D=p.d, M=p.M, WIDTH=p.width, DENSE=p.dense, HAS_NB=p.nbias is not None,
            BL=B1, BE=B2)
    return w


def dequant_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    x2 = as_tokens(x)
    bias = layer.bias_for_forward()
    y = F.linear(x2, dequantize(layer, x.dtype), None if bias is None else bias.to(x.dtype))
    return finish(layer, x, x2, y)


@KERNELS.register("triton_dequant")
class TritonDequant(TritonKernel):
    """Dequantize (Triton, per call) + dense matmul: any token count, chosen when no GEMV fits."""

    priority = 10
    kinds = ("vq", "scalar")

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        return dequant_matmul(layer, x)
