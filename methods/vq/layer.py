"""VQLinear: a vector-quantized linear layer, trained and stored (kind "vq").

Geometry. The weight W (out, in) is seen as *lines* cut into vectors of `vector_len` (d):
  * orientation "out" (VPTQ, TTVQ): a line is one input column (length out), so each vector
    holds d consecutive output rows of one input column;
  * orientation "in" (AQLM): a line is one output row (length in), vectors run along inputs.
A line whose length is not a multiple of d is zero-padded to ceil(len/d)·d: the padded entries
are never part of the weight (dequantize drops them) but the index of the padded last vector
is stored, so padding costs index bits and those bits are counted.

Codebooks. Each vector of a regular line is the sum of M codewords, one from each codebook m
(K_m entries of d values): M = 1 plain VQ, M = 2 VPTQ's residual codebook, M additive
codebooks for AQLM. How the codes were chosen (nearest, greedy residual, beam search) is the
method's business; the layer only decodes sums.

Stored buffers (state_dict() is exactly this list; stored_bits() is their sum):
  codebook<m>     (K_m, d) fp16           possibly shared with other layers
  codes<m>        packed, ceil(log2 K_m) bits, one per vector of the regular lines
  outlier_lines   packed, ceil(log2 n_lines) bits per outlier line (which lines are outliers)
  outlier_codebook (Ko, do) fp16 + outlier_codes   outlier lines with their own codebook, or
  outlier_values  (n_out, line_len) fp16  outlier lines kept in fp16 (outlier_codebook_size 0)
  norm_scale      fp16, (n_lines,) for norm "line", (1,) for norm "tensor"
  norm_bias       same shape, when norm_bias
  bias            (out,) fp16, when the linear has one
  lora_A, lora_B  (r, in), (out, r) fp16, when lora_rank > 0: W += lora_B @ lora_A
Lines are stored in their original order, so a column permutation used while quantizing
costs nothing; only outlier membership is stored explicitly.

Reconstruction, in fp32 (a quantizer builds its result with the same `assemble`, so
dequantize() reproduces it bit for bit):
  line = Σ_m codebook<m>[code<m>] per vector, trimmed to the line length
  line = line · scale + bias (norm), lines placed back, transposed for orientation "out".

Trainable mode (`make_trainable`, back with `make_stored`). Every float buffer becomes an fp32
Parameter (a codebook shared by several layers becomes one Parameter held by all of them, so
its gradient sums over every member's vectors), the codes become int64 buffers, and an
optional *latent* weight Z (the regular lines in the normalised domain, (line - norm_bias) /
norm_scale, what the codebooks approximate) joins as a Parameter. The forward value stays Ŵ:
with a latent the regular lines are Σ C[I] + (Z - Z.detach()), so the gradient w.r.t. Z is the
gradient w.r.t. Ŵ's lines (straight-through) and the gradient w.r.t. each codebook is exact.
`update_indices` re-chooses the codes from the latent (greedy residual, or the encoder a method
plugged into `encoder`, e.g. AQLM's beam search). `make_stored` rounds every float to
fp16, packs the codes and drops the latent: the stored layer computes exactly what the
trainable one computed after `round_to_storage()`.

A codebook shared by several layers is one tensor held as a buffer by each of them: the
checkpoint writes it once (storage dedupe), `count_bits` counts it once, and the `shared`
meta names its scope ("model", "model.layers.3") so sharing can be restored after a resume.
A layer's own stored_bits()/bpw() include the whole shared codebook (it is in its buffers).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ttvq_bench.choices import Choice
from ttvq_methods.layers import QuantizedLinear
from ttvq_methods.packing import pack, packed_nbytes, unpack
from ttvq_methods.registry import LAYERS
from ttvq_methods.vq.kmeans import nearest


ORIENTATIONS = ("out", "in")


class Norm(Choice):
    none = "none"
    tensor = "tensor"  # one scale (and mean) for the whole layer
    line = "line"  # one per line


# Float tensors of a VQ layer that training may change, by role.
ROLES = {"scale": ("norm_scale", "norm_bias"), "outliers": ("outlier_values",), "bias": ("bias",),
         "lora": ("lora_A", "lora_B")}


def index_bits(n: int) -> int:
    """Bits of one index into n entries (at least 1)."""
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1


def to_vectors(lines: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lines (L, len) -> vectors (L·nv, d), zero-padded, and the entry mask (1 real, 0 padded;
    None when nothing is padded)."""
    L, n = lines.shape
    nv = math.ceil(n / d)
    pad = nv * d - n
    if pad == 0:
        return lines.reshape(L * nv, d), None
    v = torch.cat([lines, lines.new_zeros(L, pad)], 1).reshape(L * nv, d)
    mask = torch.cat([lines.new_ones(L, n), lines.new_zeros(L, pad)], 1).reshape(L * nv, d)
    return v, mask


def decode(codebook: torch.Tensor, codes: torch.Tensor, line_len: int) -> torch.Tensor:
    """Codes (n_lines, nv) -> the lines they encode (n_lines, line_len), padding dropped."""
    n, nv = codes.shape
    return codebook[codes].reshape(n, nv * codebook.shape[1])[:, :line_len]


def assemble(reg: torch.Tensor, out: torch.Tensor | None, outlier_lines: torch.Tensor | None,
             scale: torch.Tensor | None, bias: torch.Tensor | None, orientation: str) -> torch.Tensor:
    """Normalised lines of the regular (reg) and outlier (out) lines -> the weight (out, in).

    Differentiable in reg, out, scale, bias (training goes through it)."""
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


@LAYERS.register("vq")
class VQLinear(QuantizedLinear):
    kind = "vq"

    def __init__(self, in_features: int, out_features: int, vector_len: int, codebook_sizes: int | list[int],
                 orientation: str = "out", n_outliers: int = 0, outlier_vector_len: int = 0,
                 outlier_codebook_size: int = 0, norm: str = "none", norm_bias: bool = False,
                 has_bias: bool = False, lora_rank: int = 0, shared: dict | None = None):
        super().__init__(in_features, out_features, has_bias)
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if norm not in Norm.values():
            raise ValueError(f"norm must be one of {Norm.values()}, got {norm!r}")
        self.orientation, self.norm = str(orientation), str(norm)
        sizes = [codebook_sizes] if isinstance(codebook_sizes, int) else [int(k) for k in codebook_sizes]
        if vector_len < 1 or not sizes or min(sizes) < 1:
            raise ValueError(f"vector_len and codebook sizes must be >= 1, got {vector_len}, {sizes}")
        self.vector_len, self.codebook_sizes = vector_len, sizes
        self.n_outliers, self.outlier_vector_len, self.outlier_codebook_size = n_outliers, outlier_vector_len, outlier_codebook_size
        self.has_norm_bias = norm_bias and self.norm != "none"
        self.lora_rank = lora_rank
        self.shared = dict(shared or {})
        self.n_lines = in_features if self.orientation == "out" else out_features
        self.line_len = out_features if self.orientation == "out" else in_features
        if not 0 <= n_outliers < self.n_lines:
            raise ValueError(f"n_outliers must be in [0, {self.n_lines}), got {n_outliers}")
        if n_outliers and outlier_codebook_size and outlier_vector_len < 1:
            raise ValueError("outliers with a codebook need outlier_vector_len >= 1")
        self.n_reg = self.n_lines - n_outliers
        self.nv = math.ceil(self.line_len / vector_len)
        self.nvo = math.ceil(self.line_len / outlier_vector_len) if outlier_vector_len else 0

        f16, u8 = dict(dtype=torch.float16), dict(dtype=torch.uint8)
        for m, K in enumerate(sizes):
            self.register_buffer(f"codebook{m}", torch.zeros(K, vector_len, **f16))
            self.register_buffer(f"codes{m}", torch.zeros(packed_nbytes(self.n_reg * self.nv, index_bits(K)), **u8))
        if n_outliers:
            self.register_buffer("outlier_lines", torch.zeros(packed_nbytes(n_outliers, self.line_index_bits), **u8))
            if outlier_codebook_size:
                self.register_buffer("outlier_codebook", torch.zeros(outlier_codebook_size, outlier_vector_len, **f16))
                self.register_buffer("outlier_codes", torch.zeros(
                    packed_nbytes(n_outliers * self.nvo, self.outlier_code_bits), **u8))
            else:
                self.register_buffer("outlier_values", torch.zeros(n_outliers, self.line_len, **f16))
        if self.norm != "none":
            n = self.n_lines if self.norm == "line" else 1
            self.register_buffer("norm_scale", torch.ones(n, **f16))
            if self.has_norm_bias:
                self.register_buffer("norm_bias", torch.zeros(n, **f16))
        if has_bias:
            self.register_buffer("bias", torch.zeros(out_features, **f16))
        if lora_rank:
            self.register_buffer("lora_A", torch.zeros(lora_rank, in_features, **f16))
            self.register_buffer("lora_B", torch.zeros(out_features, lora_rank, **f16))
        self._unpacked: dict[str, torch.Tensor] | None = None
        self.trainable = False
        self.latent: nn.Parameter | None = None  # trainable mode: regular lines, normalised
        self.latent_out: nn.Parameter | None = None  # ... and outlier lines with a codebook
        self._origin: dict[str, torch.Tensor] = {}  # trainable mode: each shared codebook's stored tensor
        # How update_indices re-chooses codes from the latent: None is the greedy residual
        # re-encoding; a method may plug in its own encoder(x, mask, books, codes) -> codes
        # (AQLM: beam search over the M codebooks, vq/beam_search.BeamEncoder). Not stored.
        self.encoder: Callable | None = None

    # -- names and widths ----------------------------------------------------------------------
    @property
    def M(self) -> int:
        return len(self.codebook_sizes)

    def code_bits(self, m: int) -> int:
        return index_bits(self.codebook_sizes[m])

    @property
    def outlier_code_bits(self) -> int:
        return index_bits(self.outlier_codebook_size)

    @property
    def line_index_bits(self) -> int:
        return index_bits(self.n_lines)

    @property
    def codebook_names(self) -> list[str]:
        """Buffers that may be shared with other layers."""
        extra = ["outlier_codebook"] if self.n_outliers and self.outlier_codebook_size else []
        return [f"codebook{m}" for m in range(self.M)] + extra

    def _packed(self) -> dict[str, tuple[int, int, tuple[int, ...]]]:
        """Integer buffers: name -> (bits, count, shape when unpacked)."""
        out = {f"codes{m}": (self.code_bits(m), self.n_reg * self.nv, (self.n_reg, self.nv)) for m in range(self.M)}
        if self.n_outliers:
            out["outlier_lines"] = (self.line_index_bits, self.n_outliers, (self.n_outliers,))
            if self.outlier_codebook_size:
                out["outlier_codes"] = (self.outlier_code_bits, self.n_outliers * self.nvo, (self.n_outliers, self.nvo))
        return out

    # -- filling the stored form -----------------------------------------------------------------
    @torch.no_grad()
    def set_codes(self, codes: list[torch.Tensor], outlier_lines: torch.Tensor | None = None,
                  outlier_codes: torch.Tensor | None = None, outlier_values: torch.Tensor | None = None) -> "VQLinear":
        """Pack integer codes: one (n_reg, nv) tensor per codebook for the regular lines in line
        order, outlier_lines (n_out,) sorted, outlier_codes (n_out, nvo) or outlier_values
        (n_out, len)."""
        if len(codes) != self.M:
            raise ValueError(f"need {self.M} code tensors, got {len(codes)}")
        for m, c in enumerate(codes):
            if tuple(c.shape) != (self.n_reg, self.nv):
                raise ValueError(f"codes must be {(self.n_reg, self.nv)}, got {tuple(c.shape)}")
            self._buffers[f"codes{m}"].copy_(pack(c, self.code_bits(m)))
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
        if name not in self.codebook_names or name not in self._buffers:
            raise ValueError(f"{name!r} is not a codebook buffer of this layer")
        if tensor.shape != self._buffers[name].shape or tensor.dtype != torch.float16:
            raise ValueError(f"shared {name} must be fp16 {tuple(self._buffers[name].shape)}, got {tensor.dtype} {tuple(tensor.shape)}")
        self._buffers[name] = tensor
        self.shared[name] = scope
        self.clear_cache()

    def clear_cache(self) -> None:
        super().clear_cache()
        self._unpacked = None

    # -- reading ---------------------------------------------------------------------------------
    def int_codes(self) -> dict[str, torch.Tensor]:
        """Integer codes as int64 tensors (unpacking is numpy work: cached in the stored form)."""
        if self.trainable:
            return {k: self._buffers[k] for k in self._packed()}
        if self._unpacked is None:
            dev = self.codebook0.device
            self._unpacked = {k: unpack(self._buffers[k], bits, n).view(shape).to(dev)
                              for k, (bits, n, shape) in self._packed().items()}
        return self._unpacked

    def float_param(self, name: str) -> torch.Tensor | None:
        """A float tensor of the layer in fp32: the stored fp16 buffer, or the trained Parameter."""
        if name in self._parameters:
            return self._parameters[name]
        t = self._buffers.get(name)
        return None if t is None else t.float()

    def _regular(self) -> torch.Tensor:
        u = self.int_codes()
        reg = decode(self.float_param("codebook0"), u["codes0"], self.line_len)
        for m in range(1, self.M):
            reg = reg + decode(self.float_param(f"codebook{m}"), u[f"codes{m}"], self.line_len)
        return reg

    def _outlier_lines_q(self) -> torch.Tensor | None:
        if not self.n_outliers:
            return None
        if self.outlier_codebook_size:
            return decode(self.float_param("outlier_codebook"), self.int_codes()["outlier_codes"], self.line_len)
        return self.float_param("outlier_values")

    def dequantize(self) -> torch.Tensor:
        """Ŵ (out, in) in fp32; with a latent in training mode, its straight-through form."""
        reg, out = self._regular(), self._outlier_lines_q()
        if self.training and torch.is_grad_enabled():
            if self.latent is not None and self.latent.requires_grad:
                reg = reg + (self.latent - self.latent.detach())
            if self.latent_out is not None and self.latent_out.requires_grad:
                out = out + (self.latent_out - self.latent_out.detach())
        w = assemble(reg, out, self.int_codes().get("outlier_lines"), self.float_param("norm_scale"),
                     self.float_param("norm_bias"), self.orientation)
        if self.lora_rank:
            w = w + self.float_param("lora_B") @ self.float_param("lora_A")
        return w

    def bits_breakdown(self) -> dict[str, int]:
        """Stored bits per buffer (their sum is stored_bits())."""
        return {k: v.numel() * v.element_size() * 8 for k, v in self.state_dict().items()}

    def meta(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, vector_len=self.vector_len,
                    codebook_sizes=list(self.codebook_sizes), orientation=self.orientation,
                    n_outliers=self.n_outliers, outlier_vector_len=self.outlier_vector_len,
                    outlier_codebook_size=self.outlier_codebook_size, norm=self.norm, norm_bias=self.has_norm_bias,
                    has_bias=self.has_bias, lora_rank=self.lora_rank, shared=dict(self.shared))

    @classmethod
    def upgrade(cls, kind: str, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Checkpoints written before M codebooks (kinds "vq" and "vq_lora", e71b0ef and
        earlier) held `codebook`/`codes` and an optional residual `res_codebook`/`res_codes`."""
        if "codebook_sizes" in meta:
            return meta, {}
        meta = dict(meta)
        K, Kr = meta.pop("codebook_size"), meta.pop("res_codebook_size", 0)
        meta["codebook_sizes"] = [K] + ([Kr] if Kr else [])
        renames = {"codebook": "codebook0", "codes": "codes0", "res_codebook": "codebook1", "res_codes": "codes1"}
        meta["shared"] = {renames.get(k, k): v for k, v in meta.get("shared", {}).items()}
        return meta, renames

    # -- trainable mode ----------------------------------------------------------------------------
    def _lines(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight (out, in) as normalised lines (n_lines, line_len)."""
        lines = weight.detach().float()
        lines = lines.T if self.orientation == "out" else lines
        nb, scale = self.float_param("norm_bias"), self.float_param("norm_scale")
        if nb is not None:
            lines = lines - nb.detach()[:, None]
        if scale is not None:
            lines = lines / scale.detach()[:, None]
        return lines

    def _split(self, lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.n_outliers:
            return lines, None
        ol = self.int_codes()["outlier_lines"]
        is_out = torch.zeros(lines.shape[0], dtype=torch.bool, device=lines.device)
        is_out[ol] = True
        return lines[~is_out], lines[ol]

    @torch.no_grad()
    def make_trainable(self, latent_weight: torch.Tensor | None = None, *, shared_params: dict | None = None,
                       lora_rank: int = 0, seed: int = 0) -> "VQLinear":
        """Switch to trainable mode (see the module docstring). `latent_weight` (out, in): the
        weight the latent starts from (None: no latent, the codes stay fixed). `shared_params`
        maps id(stored fp16 buffer) -> Parameter: pass one dict for every layer of a model so a
        shared codebook becomes one Parameter. lora_rank > 0 adds a fresh LoRA adapter
        (B = 0, so the output is unchanged) unless the layer has one."""
        if self.trainable:
            raise RuntimeError("layer is already trainable")
        shared_params = {} if shared_params is None else shared_params
        ints = self.int_codes()
        for name in self._packed():
            self._buffers[name] = ints[name].clone()
        self.trainable = True
        for name, buf in list(self._buffers.items()):
            if buf is None or not buf.is_floating_point():
                continue
            if name in self.shared:
                self._origin[name] = buf
                p = shared_params.get(id(buf))
                if p is None:
                    p = shared_params[id(buf)] = nn.Parameter(buf.float().clone())
            else:
                p = nn.Parameter(buf.float().clone())
            del self._buffers[name]
            self.register_parameter(name, p)
        if lora_rank and not self.lora_rank:
            self.lora_rank = lora_rank
            g = torch.Generator().manual_seed(seed)
            dev = self.codebook0.device
            self.lora_A = nn.Parameter((torch.randn(lora_rank, self.in_features, generator=g) / math.sqrt(self.in_features)).to(dev))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora_rank, device=dev))
        if latent_weight is not None:
            if tuple(latent_weight.shape) != (self.out_features, self.in_features):
                raise ValueError(f"weight must be {(self.out_features, self.in_features)}, got {tuple(latent_weight.shape)}")
            reg, out = self._split(self._lines(latent_weight))
            self.latent = nn.Parameter(reg.contiguous().clone())
            if out is not None and self.outlier_codebook_size:
                self.latent_out = nn.Parameter(out.contiguous().clone())
        self.clear_cache()
        return self

    @torch.no_grad()
    def round_to_storage(self) -> None:
        """Round every stored float Parameter to fp16 (kept fp32), so the trainable layer
        computes what its stored form will."""
        for name, p in self._parameters.items():
            if p is not None and name not in ("latent", "latent_out"):
                p.copy_(p.half().float())

    @torch.no_grad()
    def make_stored(self, stored: dict | None = None) -> "VQLinear":
        """Back to the stored form: floats rounded to fp16, codes packed, no latent. `stored`
        maps id(shared Parameter) -> its fp16 tensor: pass one dict for every layer of a scope.
        A shared codebook whose value did not change keeps its original tensor, so it stays the
        very tensor that layers outside this training (other blocks) hold."""
        if not self.trainable:
            raise RuntimeError("layer is not in trainable mode")
        stored = {} if stored is None else stored
        self.latent = self.latent_out = None
        for name, p in list(self._parameters.items()):
            if p is None:
                continue
            if name in self.shared:
                h = stored.get(id(p))
                if h is None:
                    orig = self._origin.get(name)
                    h = orig if orig is not None and torch.equal(p.detach().half(), orig) else p.detach().half().clone()
                    stored[id(p)] = h
            else:
                h = p.detach().half().clone()
            del self._parameters[name]
            self.register_buffer(name, h)
        dev = self.codebook0.device
        for name, (bits, _, _) in self._packed().items():
            self._buffers[name] = pack(self._buffers[name], bits).to(dev)
        self.trainable, self._origin = False, {}
        self.clear_cache()
        return self

    def params_by_role(self, frozen_scopes: tuple[str, ...] = ()) -> dict[str, list[nn.Parameter]]:
        """Trainable mode: this layer's Parameters by role ("latent", "codebook", "scale",
        "outliers", "bias", "lora"); a shared codebook appears in every member's list, unless
        its scope is one of `frozen_scopes`."""
        out = {"latent": [p for p in (self.latent, self.latent_out) if p is not None],
               "codebook": [self._parameters[n] for n in self.codebook_names
                            if n in self._parameters and self.shared.get(n) not in frozen_scopes]}
        for role, names in ROLES.items():
            out[role] = [self._parameters[n] for n in names if self._parameters.get(n) is not None]
        return out

    @torch.no_grad()
    def reset_latent(self) -> None:
        """Latent := the current quantized lines (no memory of earlier steps)."""
        if self.latent is not None:
            self.latent.copy_(self._regular())
        if self.latent_out is not None:
            self.latent_out.copy_(self._outlier_lines_q())

    @torch.no_grad()
    def latent_weight(self) -> torch.Tensor | None:
        """The latent in the weight's own domain (out, in); outlier lines without a latent take
        their quantized value."""
        if self.latent is None:
            return None
        out = self.latent_out if self.latent_out is not None else self._outlier_lines_q()
        return assemble(self.latent.detach(), None if out is None else out.detach(),
                        self.int_codes().get("outlier_lines"), self.float_param("norm_scale"),
                        self.float_param("norm_bias"), self.orientation).detach().clone()

    @torch.no_grad()
    def update_indices(self, fraction: float = 1.0) -> dict:
        """Re-choose the codes from the latent: by default each latent vector takes its nearest
        codeword of codebook 0, then of each further codebook the nearest to what is left
        (greedy, as VPTQ's residual); with an `encoder` set, the codes that encoder returns
        (AQLM: beam search over all M codebooks). A vector keeps its new codes only if they
        bring it closer. With `fraction` < 1 at most ceil(fraction · n_vectors) vectors change,
        those that gain most (PV-tuning's max_code_change_per_step). Padded entries never
        decide. Returns {"n", "changed"}."""
        if self.latent is None:
            return {"n": 0, "changed": 0}
        u = self.int_codes()
        books = [self.float_param(f"codebook{m}") for m in range(self.M)]
        n, changed = _reassign(self.latent, [u[f"codes{m}"] for m in range(self.M)], books, fraction, self.encoder)
        if self.latent_out is not None:
            n2, c2 = _reassign(self.latent_out, [u["outlier_codes"]], [self.float_param("outlier_codebook")], fraction)
            n, changed = n + n2, changed + c2
        return {"n": n, "changed": changed}


LAYERS.register("vq_lora", VQLinear)  # checkpoints of e71b0ef and earlier (see VQLinear.upgrade)


def _reassign(lat: torch.Tensor, codes: list[torch.Tensor], books: list[torch.Tensor], fraction: float,
              encoder: Callable | None = None) -> tuple[int, int]:
    d = books[0].shape[1]
    x, mask = to_vectors(lat.detach().float(), d)
    Cs = [C.detach().float() for C in books]
    curs = [c.reshape(-1) for c in codes]
    m = torch.ones_like(x) if mask is None else mask

    def dist(q):
        return (((x - q) ** 2) * m).sum(1)

    if encoder is None:
        new = [nearest(x, Cs[0], mask)]
        q_new, q_cur = Cs[0][new[0]], Cs[0][curs[0]]
        for C, cur in zip(Cs[1:], curs[1:]):
            q_cur = q_cur + C[cur]
            new.append(nearest(x - q_new, C, mask))
            q_new = q_new + C[new[-1]]
    else:
        new = [c.to(curs[0].device) for c in encoder(x, mask, Cs, curs)]
        q_new, q_cur = Cs[0][new[0]], Cs[0][curs[0]]
        for C, cur, nw in zip(Cs[1:], curs[1:], new[1:]):
            q_cur = q_cur + C[cur]
            q_new = q_new + C[nw]
    gain = dist(q_cur) - dist(q_new)
    move = gain > 0
    if len(Cs) == 1:
        move &= new[0] != curs[0]
    if fraction < 1.0:
        cap = math.ceil(fraction * x.shape[0])
        if int(move.sum()) > cap:
            keep = torch.topk(torch.where(move, gain, torch.full_like(gain, -1.0)), cap).indices
            move = torch.zeros_like(move)
            move[keep] = True
    for c, cur, nw in zip(codes, curs, new):
        cur[move] = nw[move]
        c.copy_(cur.view_as(c))
    return x.shape[0], int(move.sum())


def train_mode(layers: dict[str, VQLinear], latents: dict[str, torch.Tensor | None] | None = None, *,
               lora_rank: int = 0, seed: int = 0) -> dict[str, VQLinear]:
    """Switch `layers` to trainable mode together (shared codebooks: one Parameter)."""
    shared: dict[int, nn.Parameter] = {}
    latents = latents or {}
    for n, q in layers.items():
        q.make_trainable(latents.get(n), shared_params=shared, lora_rank=lora_rank, seed=seed)
    return layers


def stored_mode(layers: Iterable[VQLinear]) -> None:
    """Back to the stored form together (a trained shared codebook: one new fp16 tensor)."""
    stored: dict[int, torch.Tensor] = {}
    for q in layers:
        q.round_to_storage()
        q.make_stored(stored)
