"""Decode GEMV for VQ layers (1 to 16 tokens): outputs straight from codes and codebooks, the
codebook gather and the multiply-accumulate fused in one kernel, never a dense weight.

One launch per pass of `layout.vq_passes` (the regular lines with their M codebooks summed, then
the outlier lines with their own codebook or fp16 values), all adding into one fp32 accumulator:
  orientation "out" (VPTQ, TTVQ): a line is an input column. A program owns a block of output
    rows and walks the lines (split-K over lines when a GPU needs more programs); each line's
    input is scaled by its norm scale before the dot, and its norm bias adds
    sum_i x_i * nbias_i to every output.
  orientation "in" (AQLM-style): a line is an output row. A program owns a block of rows and
    walks the inputs (split-K over inputs); the row's norm scale multiplies its sum, its norm
    bias multiplies sum_i x_i.
One token uses an elementwise product and a sum (no padding to a 16-row dot); 2 to 16 tokens
use `tl.dot` in fp32 ("ieee": exact in the interpreter, and it keeps the products fp32 on a
GPU too; not tuned on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttvq_kernels.launch import DecodeKernel, accumulator, as_tokens, finish, grid_split
from ttvq_kernels.layout import VQPass, vq_passes
from ttvq_kernels.selector import KERNELS
from ttvq_kernels.tiles import add_lines, vq_tile


def blocks() -> tuple[int, int]:
    """(lines, entries) per tile: a guess for a GPU, not tuned (no GPU was available). The
    interpreter runs the same tiles, so the tests cover the shapes a GPU compiles."""
    return (32, 128)


def token_block(T: int) -> int:
    return 1 if T == 1 else max(16, triton.next_power_of_2(T))


@triton.jit
def _gemv_out(x_ptr, y_ptr, book_ptr, codes_ptr, map_ptr, scale_ptr, nbias_ptr, bias_ptr,
              T, n_lines, out_f, in_f, row_stride, k_stride, lines_per_split,
              D: tl.constexpr, M: tl.constexpr, WIDTH: tl.constexpr, DENSE: tl.constexpr,
              HAS_NB: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr):
    pid_e = tl.program_id(0)
    pid_s = tl.program_id(1)
    e = pid_e * BE + tl.arange(0, BE)  # output rows = entries along a line
    e_mask = e < out_f
    t = tl.arange(0, BT)
    t_mask = t < T
    acc = tl.zeros((BT, BE), tl.float32)
    nb_acc = tl.zeros((BT,), tl.float32)
    l_start = pid_s * lines_per_split
    l_end = tl.minimum(l_start + lines_per_split, n_lines)
    for l0 in range(l_start, l_end, BL):
        lines = l0 + tl.arange(0, BL)
        l_mask = lines < l_end
        col = tl.load(map_ptr + lines, mask=l_mask, other=0)
        xt = tl.load(x_ptr + t[:, None] * in_f + col[None, :], mask=t_mask[:, None] & l_mask[None, :],
                     other=0.0).to(tl.float32)
        xs = xt * tl.load(scale_ptr + lines, mask=l_mask, other=0.0)[None, :]
        w = vq_tile(book_ptr, codes_ptr, lines[:, None], e[None, :], l_mask[:, None] & e_mask[None, :],
                    n_lines, row_stride, k_stride, out_f, D, M, WIDTH, DENSE)
        if BT == 1:
            acc += tl.sum(tl.sum(xs, axis=0)[:, None] * w, axis=0)[None, :]
        else:
            acc += tl.dot(xs, w, input_precision="ieee")
        if HAS_NB:
            nb_acc += tl.sum(xt * tl.load(nbias_ptr + lines, mask=l_mask, other=0.0)[None, :], axis=1)
    if HAS_NB:
        acc += nb_acc[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e, mask=e_mask & (pid_s == 0), other=0.0).to(tl.float32)[None, :]
    tl.atomic_add(y_ptr + t[:, None] * out_f + e[None, :], acc, mask=t_mask[:, None] & e_mask[None, :])


@triton.jit
def _gemv_in(x_ptr, y_ptr, book_ptr, codes_ptr, map_ptr, scale_ptr, nbias_ptr, bias_ptr,
             T, n_lines, out_f, in_f, row_stride, k_stride, entries_per_split,
             D: tl.constexpr, M: tl.constexpr, WIDTH: tl.constexpr, DENSE: tl.constexpr,
             HAS_NB: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_s = tl.program_id(1)
    lines = pid_l * BL + tl.arange(0, BL)  # lines = output rows (through the pass's line map)
    l_mask = lines < n_lines
    t = tl.arange(0, BT)
    t_mask = t < T
    acc = tl.zeros((BT, BL), tl.float32)
    xsum = tl.zeros((BT,), tl.float32)
    e_start = pid_s * entries_per_split
    e_end = tl.minimum(e_start + entries_per_split, in_f)
    for e0 in range(e_start, e_end, BE):
        e = e0 + tl.arange(0, BE)
        e_mask = e < e_end
        xt = tl.load(x_ptr + t[:, None] * in_f + e[None, :], mask=t_mask[:, None] & e_mask[None, :],
                     other=0.0).to(tl.float32)
        w = vq_tile(book_ptr, codes_ptr, lines[:, None], e[None, :], l_mask[:, None] & e_mask[None, :],
                    n_lines, row_stride, k_stride, in_f, D, M, WIDTH, DENSE)
        if BT == 1:
            acc += tl.sum(xt * w, axis=1)[None, :]
        else:
            acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
        if HAS_NB:
            xsum += tl.sum(xt, axis=1)
    add_lines(y_ptr, acc, t, t_mask, lines, l_mask, out_f, map_ptr, scale_ptr, nbias_ptr, xsum, bias_ptr,
              pid_s == 0, True, HAS_NB, HAS_BIAS)


def launch_pass(p: VQPass, orientation: str, x2: torch.Tensor, acc: torch.Tensor, bias: torch.Tensor | None,
                split: int | None = None) -> None:
    """acc (T, out) += this pass's lines' share of x2 (T, in) @ W.T (+ bias when given)."""
    T, in_f = x2.shape
    out_f = acc.shape[1]
    BL, BE = blocks()
    if orientation == "out":
        kernel, n_prog, n_red, step = _gemv_out, triton.cdiv(out_f, BE), p.n, BL
    else:
        kernel, n_prog, n_red, step = _gemv_in, triton.cdiv(p.n, BL), in_f, BE
    steps = triton.cdiv(n_red, step)
    split = min(steps, split or grid_split(n_prog, steps, x2.device))
    per = triton.cdiv(steps, split) * step
    some = p.scale  # any tensor stands in for an absent one: its flag keeps it unread
    kernel[(n_prog, triton.cdiv(n_red, per))](
        x2, acc, p.codebook, some if p.dense else p.codes, p.line_map, p.scale,
        some if p.nbias is None else p.nbias, some if bias is None else bias,
        T, p.n, out_f, in_f, p.row_stride, p.k_stride, per,
        D=p.d, M=p.M, WIDTH=p.width, DENSE=p.dense, HAS_NB=p.nbias is not None, HAS_BIAS=bias is not None,
        BT=token_block(T), BL=BL, BE=BE)


def gemv(layer, x: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """y = x @ Ŵ.T + bias for a stored VQLinear; `split` forces the split-K count (tests)."""
    x2 = as_tokens(x)
    acc = accumulator(x2, layer.out_features)
    bias = layer.bias_for_forward()
    for i, p in enumerate(vq_passes(layer)):
        # Bias once per output row: every "out" pass touches every row, "in" passes own theirs.
        launch_pass(p, layer.orientation, x2, acc, bias if i == 0 or layer.orientation == "in" else None, split)
    return finish(layer, x, x2, acc)


@KERNELS.register("triton_vq_gemv")
class VQGemv(DecodeKernel):
    """Decode GEMV straight from codes, both orientations, M codebooks, outliers, norms."""

    priority = 20
    kinds = ("vq",)

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        return gemv(layer, x)
