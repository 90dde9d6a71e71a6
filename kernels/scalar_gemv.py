"""Decode GEMV for scalar layers (GPTQ, RTN; 1 to 16 tokens): each weight decoded in registers
as scale[row, group] * (code - zero[row, group]) and multiplied straight away, groups by the
column -> group map (so act-order layers need nothing special).

A program owns a block of output rows and walks the inputs (split-K over inputs when a GPU
needs more programs), adding into the fp32 accumulator with the bias once per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttvq_kernels.launch import DecodeKernel, accumulator, as_tokens, finish, grid_split
from ttvq_kernels.layout import scalar_layout
from ttvq_kernels.selector import KERNELS
from ttvq_kernels.tiles import add_lines, scalar_tile
from ttvq_kernels.vq_gemv import blocks, token_block


@triton.jit
def _gemv(x_ptr, y_ptr, codes_ptr, zeros_ptr, scales_ptr, groups_ptr, bias_ptr,
          T, out_f, in_f, row_stride, zero_stride, n_groups, zero_const, cols_per_split,
          WIDTH: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
          BT: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_o * BO + tl.arange(0, BO)
    r_mask = rows < out_f
    t = tl.arange(0, BT)
    t_mask = t < T
    acc = tl.zeros((BT, BO), tl.float32)
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, in_f)
    for c0 in range(c_start, c_end, BI):
        cols = c0 + tl.arange(0, BI)
        c_mask = cols < c_end
        xt = tl.load(x_ptr + t[:, None] * in_f + cols[None, :], mask=t_mask[:, None] & c_mask[None, :],
                     other=0.0).to(tl.float32)
        w = scalar_tile(codes_ptr, zeros_ptr, scales_ptr, groups_ptr, rows[:, None], cols[None, :],
                        r_mask[:, None] & c_mask[None, :], row_stride, zero_stride, n_groups, zero_const,
                        WIDTH, HAS_ZEROS)
        if BT == 1:
            acc += tl.sum(xt * w, axis=1)[None, :]
        else:
            acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
    add_lines(y_ptr, acc, t, t_mask, rows, r_mask, out_f, bias_ptr, bias_ptr, bias_ptr, acc, bias_ptr,
              pid_s == 0, False, False, HAS_BIAS)


def gemv(layer, x: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """y = x @ Ŵ.T + bias for a ScalarQuantLinear; `split` forces the split-K count (tests)."""
    x2 = as_tokens(x)
    T, in_f = x2.shape
    acc = accumulator(x2, layer.out_features)
    bias = layer.bias_for_forward()
    lay = scalar_layout(layer)
    BO, BI = blocks()  # the "in" VQ GEMV's tile: rows x inputs
    steps = triton.cdiv(in_f, BI)
    n_prog = triton.cdiv(layer.out_features, BO)
    split = min(steps, split or grid_split(n_prog, steps, x2.device))
    per = triton.cdiv(steps, split) * BI
    zeros = lay.codes if lay.zeros is None else lay.zeros
    _gemv[(n_prog, triton.cdiv(in_f, per))](
        x2, acc, lay.codes, zeros, layer.scales, lay.groups, layer.scales if bias is None else bias,
        T, layer.out_features, in_f, lay.codes.shape[1], zeros.shape[1], layer.n_groups, lay.zero_const, per,
        WIDTH=lay.width, HAS_ZEROS=lay.zeros is not None, HAS_BIAS=bias is not None, BT=token_block(T), BO=BO, BI=BI)
    return finish(layer, x, x2, acc)


@KERNELS.register("triton_scalar_gemv")
class ScalarGemv(DecodeKernel):
    """Decode GEMV for scalar layers at any bit width and grouping."""

    priority = 20
    kinds = ("scalar",)

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        return gemv(layer, x)
