"""Triton building blocks every kernel shares: one code read from the aligned layout
(`layout.py`), one tile of a VQ or scalar weight decoded in fp32, and the per-line epilogue of
kernels whose lines are output rows.

Index arithmetic is int32 throughout: a uint8 code times a stride would wrap in Triton (it does
not promote), so every code is cast to int32 before it becomes an offset. Launchers refuse
tensors of 2^31 elements or more, so int32 offsets cannot overflow.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def code_at(codes_ptr, rows, cols, row_stride, mask, WIDTH: tl.constexpr):
    """Codes at (rows, cols) (broadcastable int32 tensors) of an aligned (rows, row_stride)
    layout, as int32."""
    if WIDTH < 8:  # 8 // WIDTH codes per byte, the first in the lowest bits
        byte = tl.load(codes_ptr + rows * row_stride + cols // (8 // WIDTH), mask=mask, other=0).to(tl.int32)
        return (byte >> ((cols % (8 // WIDTH)) * WIDTH)) & ((1 << WIDTH) - 1)
    else:
        c = tl.load(codes_ptr + rows * row_stride + cols, mask=mask, other=0).to(tl.int32)
        if WIDTH == 16:
            c = c & 0xFFFF  # stored as int16: the high half of a code >= 2^15 reads back negative
        return c


@triton.jit
def vq_tile(book_ptr, codes_ptr, lines, entries, mask, n_lines, row_stride, k_stride, line_len,
            D: tl.constexpr, M: tl.constexpr, WIDTH: tl.constexpr, DENSE: tl.constexpr):
    """Normalised line values (lines x entries) of one VQ pass, fp32, 0 where masked.

    Entry e of a line is element e % D of its vector e // D; working per entry (not per
    vector) keeps tiles power-of-two sized for any D, the price being D loads of the same code
    (one cache line). A dense pass (fp16 outlier lines) reads the values directly."""
    if DENSE:
        return tl.load(book_ptr + lines * line_len + entries, mask=mask, other=0.0).to(tl.float32)
    else:
        j = entries // D
        dd = entries % D
        acc = tl.zeros(mask.shape, tl.float32)
        for m in tl.static_range(M):
            c = code_at(codes_ptr + m * n_lines * row_stride, lines, j, row_stride, mask, WIDTH)
            acc += tl.load(book_ptr + (m * k_stride + c) * D + dd, mask=mask, other=0.0).to(tl.float32)
        return acc


@triton.jit
def scalar_tile(codes_ptr, zeros_ptr, scales_ptr, groups_ptr, rows, cols, mask, row_stride, zero_stride,
                n_groups, zero_const, WIDTH: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """Weights (rows x cols) of a scalar layer, fp32: scale * (q - zero), the same expression
    in the same precision as ScalarQuantLinear.dequantize, so the values are bit-identical."""
    q = code_at(codes_ptr, rows, cols, row_stride, mask, WIDTH).to(tl.float32)
    g = tl.load(groups_ptr + cols + rows * 0, mask=mask, other=0)
    s = tl.load(scales_ptr + rows * n_groups + g, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = code_at(zeros_ptr, rows, g, zero_stride, mask, WIDTH).to(tl.float32)
    else:
        z = zero_const
    return s * (q - z)


@triton.jit
def add_lines(y_ptr, acc, t, t_mask, lines, l_mask, y_stride, map_ptr, scale_ptr, nbias_ptr, xsum, bias_ptr,
              first, HAS_MAP: tl.constexpr, HAS_NB: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y[t, row(l)] += acc[t, l] * scale[l] (+ xsum[t] * nbias[l]) (+ bias[row] when `first`),
    for kernels whose lines are output rows. Atomic, because a row's sum may be split over
    several programs (split-K) and passes."""
    rows = lines
    if HAS_MAP:
        rows = tl.load(map_ptr + lines, mask=l_mask, other=0)
        acc = acc * tl.load(scale_ptr + lines, mask=l_mask, other=0.0)[None, :]
    if HAS_NB:
        acc += xsum[:, None] * tl.load(nbias_ptr + lines, mask=l_mask, other=0.0)[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + rows, mask=l_mask & first, other=0.0).to(tl.float32)
        acc += b[None, :]
    tl.atomic_add(y_ptr + t[:, None] * y_stride + rows[None, :], acc, mask=t_mask[:, None] & l_mask[None, :])
