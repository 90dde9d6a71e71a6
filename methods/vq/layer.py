"""VQLinear: the stored form of a vector-quantized linear layer (kind "vq").

Geometry. The weight W (out, in) is seen as *lines* cut into vectors of `vector_len` (d):
  * orientation "out" (VPTQ, `enable_transpose`): a line is one input column (length out), so
    each vector holds d consecutive output rows of one input column;
  * orientation "in" (AQLM): a line is one output row (length in), vectors run along inputs.
A line whose length is not a multiple of d is zero-padded to ceil(len/d)·d: the padded entries
are never part of the weight (dequantize drops them) but the index of the padded last vector
is stored, so padding costs index bits and those bits are counted.

Stored buffers (state_dict() is exactly this list; stored_bits() is their sum):
  codebook        (K, d) fp16             main codebook (possibly shared with other layers)
  codes           packed, ceil(log2 K) bits, one per vector of the regular lines
  res_codebook    (Kr, d) fp16            residual codebook (res_codebook_size > 0)
  res_codes       packed, ceil(log2 Kr) bits per vector
  outlier_lines   packed, ceil(log2 n_lines) bits per outlier line (which lines are outliers)
  outlier_codebook (Ko, do) fp16 + outlier_codes   outlier lines with their own codebook, or
  outlier_values  (n_out, line_len) fp16  outlier lines kept in fp16 (outlier_codebook_size 0)
  norm_scale      fp16, (n_lines,) for norm "line", (1,) for norm "tensor"
  norm_bias       same shape, when norm_bias
  bias            (out,) fp16, when the linear has one
Lines are stored in their original order, so a column permutation used while quantizing
costs nothing (it is absorbed); only outlier membership is stored explicitly.

Reconstruction, in fp32 (the quantizer builds its result with the same `assemble`, so
dequantize() reproduces it bit for bit):
  line = codebook[code] (+ res_codebook[res_code]) per vector, trimmed to the line length
  line = line · scale + bias (norm), lines placed back, transposed for orientation "out".

A codebook shared by several layers is one tensor held as a buffer by each of them: the
checkpoint writes it once (storage dedupe), `count_bits` counts it once, and the `shared`
meta names its scope ("model", "model.layers.3") so sharing can be restored after a resume.
A layer's own stored_bits()/bpw() include the whole shared codebook (it is in its buffers).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ttvq_methods.layers import QuantizedLinear
from ttvq_methods.packing import pack, packed_nbytes, unpack
from ttvq_methods.registry import register_layer

ORIENTATIONS = ("out", "in")
NORMS = ("none", "tensor", "line")
CODEBOOKS = ("codebook", "res_codebook", "outlier_codebook")  # buffers that may be shared


def index_bits(n: int) -> int:
    """Bits of one index into n entries (at least 1)."""
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1


def decode(codebook: torch.Tensor, codes: torch.Tensor, line_len: int) -> torch.Tensor:
    """Codes (n_lines, nv) -> the lines they encode (n_lines, line_len), padding dropped."""
    n, nv = codes.shape
    return codebook[codes].reshape(n, nv * codebook.shape[1])[:, :line_len]


def assemble(reg: torch.Tensor, out: torch.Tensor | None, outlier_lines: torch.Tensor | None,
             scale: torch.Tensor | None, bias: torch.Tensor | None, orientation: str) -> torch.Tensor:
    """Normalised lines of the regular (reg) and outlier (out) lines -> the weight (out, in).

    Differentiable in reg, out, scale, bias (fine-tuning goes through it)."""
    n_reg = reg.shape[0]
    if out is not None and out.shape[0]:
        n_lines = n_reg + out.shape[0]
        is_out = torch.zeros(n_lines, dtype=torch.bool, device=reg.device)
        is_out[outlier_lines] = True
        order = torch.cat([(~is_out).nonzero().squeeze(1), outlier_lines.to(reg.device)])
        lines = torch.cat([reg, out])[torch.argsort(order)]
    else:
        lines = reg
    if scale is not None:
        lines = lines * scale[:, None]
    if bias is not None:
        lines = lines + bias[:, None]
    return lines.T.contiguous() if orientation == "out" else lines


@register_layer
class VQLinear(QuantizedLinear):
    kind = "vq"

    def __init__(self, in_features: int, out_features: int, vector_len: int, codebook_size: int,
                 orientation: str = "out", res_codebook_size: int = 0, n_outliers: int = 0,
                 outlier_vector_len: int = 0, outlier_codebook_size: int = 0, norm: str = "none",
                 norm_bias: bool = False, has_bias: bool = False, shared: dict | None = None):
        super().__init__(in_features, out_features, has_bias)
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if vector_len < 1 or codebook_size < 1:
            raise ValueError(f"vector_len and codebook_size must be >= 1, got {vector_len}, {codebook_size}")
        self.orientation, self.vector_len, self.codebook_size = orientation, vector_len, codebook_size
        self.res_codebook_size, self.n_outliers = res_codebook_size, n_outliers
        self.outlier_vector_len, self.outlier_codebook_size = outlier_vector_len, outlier_codebook_size
        self.norm, self.has_norm_bias = norm, norm_bias and norm != "none"
        self.shared = dict(shared or {})
        self.n_lines = in_features if orientation == "out" else out_features
        self.line_len = out_features if orientation == "out" else in_features
        if not 0 <= n_outliers < self.n_lines:
            raise ValueError(f"n_outliers must be in [0, {self.n_lines}), got {n_outliers}")
        if n_outliers and outlier_codebook_size and outlier_vector_len < 1:
            raise ValueError("outliers with a codebook need outlier_vector_len >= 1")
        self.n_reg = self.n_lines - n_outliers
        self.nv = math.ceil(self.line_len / vector_len)

        f16, u8 = dict(dtype=torch.float16), dict(dtype=torch.uint8)
        self.register_buffer("codebook", torch.zeros(codebook_size, vector_len, **f16))
        self.register_buffer("codes", torch.zeros(packed_nbytes(self.n_reg * self.nv, self.code_bits), **u8))
        if res_codebook_size:
            self.register_buffer("res_codebook", torch.zeros(res_codebook_size, vector_len, **f16))
            self.register_buffer("res_codes", torch.zeros(packed_nbytes(self.n_reg * self.nv, self.res_code_bits), **u8))
        if n_outliers:
            self.register_buffer("outlier_lines", torch.zeros(packed_nbytes(n_outliers, self.line_index_bits), **u8))
            if outlier_codebook_size:
                self.nvo = math.ceil(self.line_len / outlier_vector_len)
                self.register_buffer("outlier_codebook", torch.zeros(outlier_codebook_size, outlier_vector_len, **f16))
                self.register_buffer("outlier_codes", torch.zeros(
                    packed_nbytes(n_outliers * self.nvo, self.outlier_code_bits), **u8))
            else:
                self.register_buffer("outlier_values", torch.zeros(n_outliers, self.line_len, **f16))
        if norm != "none":
            n = self.n_lines if norm == "line" else 1
            self.register_buffer("norm_scale", torch.ones(n, **f16))
            if self.has_norm_bias:
                self.register_buffer("norm_bias", torch.zeros(n, **f16))
        if has_bias:
            self.register_buffer("bias", torch.zeros(out_features, **f16))
        self._unpacked: dict[str, torch.Tensor] | None = None
        self._ft: dict[str, torch.Tensor] | None = None  # fp32 stand-ins while fine-tuning

    # -- index widths ------------------------------------------------------------------------
    @property
    def code_bits(self) -> int:
        return index_bits(self.codebook_size)

    @property
    def res_code_bits(self) -> int:
        return index_bits(self.res_codebook_size)

    @property
    def outlier_code_bits(self) -> int:
        return index_bits(self.outlier_codebook_size)

    @property
    def line_index_bits(self) -> int:
        return index_bits(self.n_lines)

    # -- filling -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, res_codes: torch.Tensor | None = None,
                  outlier_lines: torch.Tensor | None = None, outlier_codes: torch.Tensor | None = None,
                  outlier_values: torch.Tensor | None = None) -> "VQLinear":
        """Pack integer codes: codes/res_codes (n_reg, nv) of the regular lines in line order,
        outlier_lines (n_out,) sorted, outlier_codes (n_out, nvo) or outlier_values (n_out, len)."""
        if tuple(codes.shape) != (self.n_reg, self.nv):
            raise ValueError(f"codes must be {(self.n_reg, self.nv)}, got {tuple(codes.shape)}")
        self.codes.copy_(pack(codes, self.code_bits))
        if self.res_codebook_size:
            self.res_codes.copy_(pack(res_codes, self.res_code_bits))
        if self.n_outliers:
            ol = outlier_lines.cpu().long()
            if not torch.equal(ol, ol.sort().values) or ol.unique().numel() != ol.numel():
                raise ValueError("outlier_lines must be sorted and distinct")
            self.outlier_lines.copy_(pack(ol, self.line_index_bits))
            if self.outlier_codebook_size:
                self.outlier_codes.copy_(pack(outlier_codes, self.outlier_code_bits))
            else:
                self.outlier_values.copy_(outlier_values.half())
        self.clear_cache()
        return self

    def set_norm(self, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            self.norm_scale.copy_(scale.reshape(-1).half())
            if self.has_norm_bias:
                self.norm_bias.copy_(bias.reshape(-1).half())
        self.clear_cache()

    def share(self, name: str, tensor: torch.Tensor, scope: str) -> None:
        """Hold `tensor` (fp16, the right shape) as this layer's codebook buffer `name`, the very
        object other layers of the same scope hold."""
        if name not in CODEBOOKS or name not in self._buffers:
            raise ValueError(f"{name!r} is not a codebook buffer of this layer")
        if tensor.shape != self._buffers[name].shape or tensor.dtype != torch.float16:
            raise ValueError(f"shared {name} must be fp16 {tuple(self._buffers[name].shape)}, got {tensor.dtype} {tuple(tensor.shape)}")
        self._buffers[name] = tensor
        self.shared[name] = scope
        self.clear_cache()

    def clear_cache(self) -> None:
        super().clear_cache()
        self._unpacked = None

    # -- reading -----------------------------------------------------------------------------
    def unpacked(self) -> dict[str, torch.Tensor]:
        """Integer codes as int64 tensors, cached (unpacking is numpy work)."""
        if self._unpacked is None:
            dev = self.codebook.device
            u = {"codes": unpack(self.codes, self.code_bits, self.n_reg * self.nv).view(self.n_reg, self.nv)}
            if self.res_codebook_size:
                u["res_codes"] = unpack(self.res_codes, self.res_code_bits, self.n_reg * self.nv).view(self.n_reg, self.nv)
            if self.n_outliers:
                u["outlier_lines"] = unpack(self.outlier_lines, self.line_index_bits, self.n_outliers)
                if self.outlier_codebook_size:
                    u["outlier_codes"] = unpack(self.outlier_codes, self.outlier_code_bits,
                                                self.n_outliers * self.nvo).view(self.n_outliers, self.nvo)
            self._unpacked = {k: v.to(dev) for k, v in u.items()}
        return self._unpacked

    def float_param(self, name: str) -> torch.Tensor | None:
        """A stored float tensor in fp32, or its fine-tuning stand-in."""
        if self._ft is not None and name in self._ft:
            return self._ft[name]
        t = self._buffers.get(name)
        return None if t is None else t.float()

    def dequantize(self) -> torch.Tensor:
        u = self.unpacked()
        reg = decode(self.float_param("codebook"), u["codes"], self.line_len)
        if self.res_codebook_size:
            reg = reg + decode(self.float_param("res_codebook"), u["res_codes"], self.line_len)
        out = None
        if self.n_outliers:
            if self.outlier_codebook_size:
                out = decode(self.float_param("outlier_codebook"), u["outlier_codes"], self.line_len)
            else:
                out = self.float_param("outlier_values")
        return assemble(reg, out, u.get("outlier_lines"), self.float_param("norm_scale"),
                        self.float_param("norm_bias"), self.orientation)

    def bits_breakdown(self) -> dict[str, int]:
        """Stored bits per buffer (their sum is stored_bits())."""
        return {k: v.numel() * v.element_size() * 8 for k, v in self.state_dict().items()}

    def meta(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, vector_len=self.vector_len,
                    codebook_size=self.codebook_size, orientation=self.orientation,
                    res_codebook_size=self.res_codebook_size, n_outliers=self.n_outliers,
                    outlier_vector_len=self.outlier_vector_len, outlier_codebook_size=self.outlier_codebook_size,
                    norm=self.norm, norm_bias=self.has_norm_bias, has_bias=self.has_bias, shared=dict(self.shared))

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "VQLinear":
        return cls(**meta)
