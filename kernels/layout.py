"""Kernel-friendly copies of a quantized layer's integers, built once per layer and cached.

A layer stores its codes as one little-endian bitstream at any width (`methods/packing.py`):
compact, but a code may straddle two bytes, so a kernel would have to unpack the stream on
every call. Kernels read this layout instead:

  aligned codes   each row of codes starts on a byte; a code takes `width` bits, the power of
                  two >= its bit count (1, 2, 4 or 8 bits: 8 // width codes per byte, lowest
                  bits first; 16: int16, read back with `& 0xFFFF`; 32: int32). A byte never
                  holds parts of two codes, so `tiles.code_at` reads any code with one load,
                  one shift and one mask. Cost: K = 256 (8 bits) and 2/4-bit codes take exactly
                  their stored bits; 3-bit codes take 4, 12-bit codes 16.
  VQ passes       the regular lines (M codebooks stacked to (M, K_max, d) fp16, codes
                  (M, n, row_bytes)) and, when the layer has outliers, the outlier lines (their
                  own codebook, or their fp16 values as "dense" lines), each with its map from
                  pass-local line to the layer's line and the norm scale/bias per line in fp32.
  scalar          codes and zeros aligned the same way, the column -> group map as int32.

The copy is a plain attribute of this module's cache (a WeakKeyDictionary keyed by layer), never
a buffer, so it is never saved or counted in bits. It is rebuilt whenever a buffer it was built
from is replaced or changed in place (each buffer's identity and version counter are compared on
every call): that covers every reason `clear_cache()` is called (load_state_dict, share,
make_stored) and moving the layer to another device.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from ttvq_methods.packing import unpack

# layer -> (stamp of its buffers, the kernel-friendly copy, weak references to those buffers)
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, object, list]]" = weakref.WeakKeyDictionary()


def width_for(bits: int) -> int:
    """Bits a code takes in the aligned layout: the power of two >= bits."""
    return 1 << max(0, math.ceil(math.log2(bits)))


def aligned(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Integer codes (rows, cols) -> (the aligned tensor (rows, row_stride), width)."""
    w = width_for(bits)
    v = values.to(torch.int64)
    if w == 8:
        return v.to(torch.uint8).contiguous(), w
    if w == 16:  # int16 has no unsigned twin in Triton's pointer types: store the low 16 bits
        return torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16).contiguous(), w
    if w == 32:
        return v.to(torch.int32).contiguous(), w
    per = 8 // w
    rows, cols = v.shape
    v = torch.nn.functional.pad(v, (0, -cols % per)).view(rows, -1, per)
    shifts = torch.arange(per, device=v.device) * w
    return (v << shifts).sum(-1).to(torch.uint8).contiguous(), w


def _stamp(layer: torch.nn.Module) -> tuple:
    out = []
    for name, t in layer._buffers.items():
        if t is None:
            continue
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter
            version = None
        out.append((name, id(t), version))
    return tuple(out)


def cached(layer: torch.nn.Module, build: Callable[[torch.nn.Module], object]):
    """build(layer), reused while the layer's buffers are the same tensors at the same version."""
    stamp = _stamp(layer)
    hit = _CACHE.get(layer)
    # id() alone could be reused by a new tensor after the old one died; the entry keeps weak
    # references to the buffers it was built from, so a dead one is a miss.
    if hit is not None and hit[0] == stamp and all(r() is not None for r in hit[2]):
        return hit[1]
    value = build(layer)
    refs = [weakref.ref(t) for t in layer._buffers.values() if t is not None]
    _CACHE[layer] = (stamp, value, refs)
    return value


@dataclass
class VQPass:
    """One set of lines a kernel launch covers (see the module docstring)."""

    codebook: torch.Tensor  # (M, k_stride, d) fp16, or (n, line_len) fp16 values when dense
    codes: torch.Tensor | None  # (M, n, row_stride) aligned codes; None when dense
    width: int  # bits per code in `codes`
    d: int  # vector length (1 when dense)
    M: int  # codebooks summed
    k_stride: int  # rows per codebook in `codebook` (the largest K_m)
    code_bits: int  # stored bits per code (the largest over m)
    n: int  # lines in this pass
    line_map: torch.Tensor  # (n,) int32: pass line -> layer line (input column or output row)
    scale: torch.Tensor  # (n,) fp32 norm scale per line (ones without a norm)
    nbias: torch.Tensor | None  # (n,) fp32 norm bias per line

    @property
    def dense(self) -> bool:
        return self.codes is None

    @property
    def row_stride(self) -> int:
        return 0 if self.codes is None else self.codes.shape[-1]


def vq_passes(layer) -> list[VQPass]:
    """The regular pass, then the outlier pass when the layer has outliers."""
    return cached(layer, _build_vq)


def _build_vq(layer) -> list[VQPass]:
    dev = layer.codebook0.device
    u = {k: v.to(dev) for k, v in layer.int_codes().items()}
    n_lines = layer.n_lines

    def per_line(name: str) -> torch.Tensor | None:
        t = layer.float_param(name)  # (n_lines,) for norm "line", (1,) for "tensor"
        return None if t is None else t.to(dev).expand(n_lines).contiguous()

    scale = per_line("norm_scale")
    scale = torch.ones(n_lines, device=dev) if scale is None else scale
    nbias = per_line("norm_bias")
    # Regular lines are every line that is not an outlier, in ascending order (the order their
    # codes are stored in, see VQLinear's docstring).
    is_reg = torch.ones(n_lines, dtype=torch.bool, device=dev)
    if layer.n_outliers:
        is_reg[u["outlier_lines"]] = False
    reg_map = is_reg.nonzero().squeeze(1)

    def make(books, codes, bits, line_map):
        k = max(b.shape[0] for b in books)
        stacked = torch.zeros(len(books), k, books[0].shape[1], dtype=torch.float16, device=dev)
        for m, b in enumerate(books):
            stacked[m, : b.shape[0]] = b
        al = [aligned(c, bits) for c in codes]
        return VQPass(stacked, torch.stack([a for a, _ in al]), al[0][1], books[0].shape[1], len(books), k, bits,
                      len(line_map), line_map.to(torch.int32), scale[line_map].contiguous(),
                      None if nbias is None else nbias[line_map].contiguous())

    bits = max(layer.code_bits(m) for m in range(layer.M))
    passes = [make([getattr(layer, f"codebook{m}") for m in range(layer.M)],
                   [u[f"codes{m}"] for m in range(layer.M)], bits, reg_map)]
    if layer.n_outliers:
        ol = u["outlier_lines"]
        if layer.outlier_codebook_size:
            passes.append(make([layer.outlier_codebook], [u["outlier_codes"]], layer.outlier_code_bits, ol))
        else:
            passes.append(VQPass(layer.outlier_values.contiguous(), None, 0, 1, 1, 0, 16, len(ol),
                                 ol.to(torch.int32), scale[ol].contiguous(),
                                 None if nbias is None else nbias[ol].contiguous()))
    return passes


@dataclass
class ScalarLayout:
    codes: torch.Tensor  # (out, row_stride) aligned
    zeros: torch.Tensor | None  # (out, zero_stride) aligned, None when symmetric
    width: int
    groups: torch.Tensor  # (in,) int32 column -> group
    zero_const: float  # the fixed zero of a symmetric layer


def scalar_layout(layer) -> ScalarLayout:
    return cached(layer, _build_scalar)


def _build_scalar(layer) -> ScalarLayout:
    dev, m, k, G, b = layer.scales.device, layer.out_features, layer.in_features, layer.n_groups, layer.bits
    codes, w = aligned(unpack(layer.codes, b, m * k).view(m, k).to(dev), b)
    zeros = None if layer.sym else aligned(unpack(layer.zeros, b, m * G).view(m, G).to(dev), b)[0]
    return ScalarLayout(codes, zeros, w, layer.column_groups().to(dev, torch.int32).contiguous(),
                        float(2**b / 2))  # (maxq + 1) / 2, as ScalarQuantLinear.dequantize
