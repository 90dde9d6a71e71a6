"""Lookup-table GEMV for VQ layers with small codebooks along inputs (orientation "in",
AQLM-style): per input segment (one vector position j) the dot products of x with every
codeword are computed once, then each output row sums the table entries its codes choose:

    table[t, m, j, k] = sum_e x[t, j*d + e] * C_m[k, e]          (T x M x nv x K)
    y[t, row]         = scale[row] * sum_m sum_j table[t, m, j, code_m[row, j]]  (+ norm bias, bias)

The table replaces d multiply-adds per code with one load, so it pays when the table is small
next to the codes it serves. `VQLut.fits` takes it only when the table (fp32) is no larger
than the codes of the regular lines: T * K * 32 <= n_rows * code_width bits, with every K <= 256.
That rule is a reasoned guess, not a GPU measurement.

Two Triton kernels (the table through global memory: Triton cannot index registers by a runtime
code), then outlier rows, if any, through `vq_gemv.launch_pass`. `lut_torch` is the same
algorithm in torch: the CPU benchmark's LUT figure, and a second check of the arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ttvq_kernels.launch import MAX_DECODE_TOKENS, TritonKernel, accumulator, as_tokens, finish, grid_split
from ttvq_kernels.layout import vq_passes, width_for
from ttvq_kernels.selector import KERNELS
from ttvq_kernels.tiles import add_lines, code_at
from ttvq_kernels.vq_gemv import launch_pass

MAX_K = 256  # "small codebook": the table row of one segment stays within one tile


@triton.jit
def _lut_table(x_ptr, book_ptr, table_ptr, T, in_f, nv, k_stride,
               D: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    pid_j = tl.program_id(0)
    m = tl.program_id(1)
    M = tl.num_programs(1)
    j = pid_j * BJ + tl.arange(0, BJ)
    j_mask = j < nv
    k = tl.arange(0, BK)
    k_mask = k < k_stride
    for t in range(T):
        acc = tl.zeros((BJ, BK), tl.float32)
        for e in tl.static_range(D):
            col = j * D + e  # the padding past in_f reads as 0, as it is absent from the weight
            xv = tl.load(x_ptr + t * in_f + col, mask=j_mask & (col < in_f), other=0.0).to(tl.float32)
            cv = tl.load(book_ptr + (m * k_stride + k) * D + e, mask=k_mask, other=0.0).to(tl.float32)
            acc += xv[:, None] * cv[None, :]
        tl.store(table_ptr + ((t * M + m) * nv + j[:, None]) * k_stride + k[None, :], acc,
                 mask=j_mask[:, None] & k_mask[None, :])


@triton.jit
def _lut_lookup(table_ptr, codes_ptr, y_ptr, map_ptr, scale_ptr, nbias_ptr, xsum_ptr, bias_ptr,
                n_lines, nv, out_f, row_stride, k_stride, vecs_per_split,
                M: tl.constexpr, WIDTH: tl.constexpr, HAS_NB: tl.constexpr, HAS_BIAS: tl.constexpr,
                BL: tl.constexpr, BJ: tl.constexpr):
    pid_l = tl.program_id(0)
    t = tl.program_id(1)
    pid_s = tl.program_id(2)
    lines = pid_l * BL + tl.arange(0, BL)
    l_mask = lines < n_lines
    acc = tl.zeros((BL,), tl.float32)
    j_start = pid_s * vecs_per_split
    j_end = tl.minimum(j_start + vecs_per_split, nv)
    for j0 in range(j_start, j_end, BJ):
        j = j0 + tl.arange(0, BJ)
        mask = l_mask[:, None] & (j < j_end)[None, :]
        for m in tl.static_range(M):
            c = code_at(codes_ptr + m * n_lines * row_stride, lines[:, None], j[None, :], row_stride, mask, WIDTH)
            acc += tl.sum(tl.load(table_ptr + ((t * M + m) * nv + j[None, :]) * k_stride + c, mask=mask, other=0.0),
                          axis=1)
    ts = t + tl.arange(0, 1)
    xsum = tl.zeros((1,), tl.float32)
    if HAS_NB:  # sum_i x_i is over all inputs: split 0 adds it
        xsum = tl.load(xsum_ptr + ts, mask=(ts >= 0) & (pid_s == 0), other=0.0)
    add_lines(y_ptr, acc[None, :], ts, ts >= 0, lines, l_mask, out_f, map_ptr, scale_ptr, nbias_ptr, xsum, bias_ptr,
              pid_s == 0, True, HAS_NB, HAS_BIAS)


def blocks() -> tuple[int, int]:
    """(segments, rows) per program: a guess for a GPU, not tuned; the interpreter runs the same."""
    return (32, 64)


def lut_gemv(layer, x: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """y = x @ Ŵ.T + bias for a stored VQLinear of orientation "in" with K <= 256."""
    x2 = as_tokens(x)
    T, in_f = x2.shape
    acc = accumulator(x2, layer.out_features)
    bias = layer.bias_for_forward()
    reg, *outliers = vq_passes(layer)
    BJ, BL = blocks()
    table = torch.empty(T, reg.M, layer.nv, reg.k_stride, device=x2.device, dtype=torch.float32)
    _lut_table[(triton.cdiv(layer.nv, BJ), reg.M)](x2, reg.codebook, table, T, in_f, layer.nv, reg.k_stride,
                                                   D=reg.d, BJ=BJ, BK=triton.next_power_of_2(reg.k_stride))
    steps = triton.cdiv(layer.nv, BJ)
    n_prog = triton.cdiv(reg.n, BL) * T
    split = min(steps, split or grid_split(n_prog, steps, x2.device))
    per = triton.cdiv(steps, split) * BJ
    xsum = x2.float().sum(1) if reg.nbias is not None else table
    _lut_lookup[(triton.cdiv(reg.n, BL), T, triton.cdiv(layer.nv, per))](
        table, reg.codes, acc, reg.line_map, reg.scale, table if reg.nbias is None else reg.nbias, xsum,
        table if bias is None else bias, reg.n, layer.nv, layer.out_features, reg.row_stride, reg.k_stride, per,
        M=reg.M, WIDTH=reg.width, HAS_NB=reg.nbias is not None, HAS_BIAS=bias is not None, BL=BL, BJ=BJ)
    for p in outliers:
        launch_pass(p, "in", x2, acc, bias, split)
    return finish(layer, x, x2, acc)


@torch.no_grad()
def lut_torch(layer, x: torch.Tensor) -> torch.Tensor:
    """The LUT algorithm in torch, one token at a time (bounded memory). Regular lines only: a
    layer with outlier rows is refused."""
    if layer.orientation != "in" or layer.n_outliers:
        raise ValueError("lut_torch: orientation 'in' without outliers only")
    reg = vq_passes(layer)[0]
    u = layer.int_codes()
    x2 = as_tokens(x)
    xf = x2.float()
    d, nv = layer.vector_len, layer.nv
    segs = F.pad(xf, (0, nv * d - layer.in_features)).view(-1, nv, d)
    # flat index of (segment j, code c) in a (nv, K) table: one gather per codebook and token
    idx = [u[f"codes{m}"] + torch.arange(nv, device=x2.device) * layer.codebook_sizes[m] for m in range(layer.M)]
    books = [layer.float_param(f"codebook{m}") for m in range(layer.M)]
    y = torch.zeros(xf.shape[0], layer.out_features, device=xf.device)
    for t in range(xf.shape[0]):
        s = sum(torch.take(segs[t] @ C.T, i).sum(1) for C, i in zip(books, idx))
        y[t, reg.line_map.long()] = s * reg.scale + (0 if reg.nbias is None else xf[t].sum() * reg.nbias)
    bias = layer.bias_for_forward()
    if bias is not None:
        y += bias.float()
    return finish(layer, x, x2, y)


@KERNELS.register("triton_vq_lut")
class VQLut(TritonKernel):
    """LUT GEMV: orientation "in", every K <= 256, table no bigger than the codes."""

    priority = 30
    kinds = ("vq",)

    @classmethod
    def fits(cls, layer, tokens: int) -> bool:
        if layer.orientation != "in" or tokens > MAX_DECODE_TOKENS or max(layer.codebook_sizes) > MAX_K:
            return False
        width = width_for(max(layer.code_bits(m) for m in range(layer.M)))
        return tokens * max(layer.codebook_sizes) * 32 <= layer.n_reg * width

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        return lut_gemv(layer, x)
