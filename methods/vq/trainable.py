"""TrainableVQ: a vector-quantized linear layer while it is being optimised (TTVQ and any
method that trains VQ layers), and VQLoRALinear, the stored form of a VQ layer with a LoRA
adapter (kind "vq_lora").

A TrainableVQ is built from a stored VQLinear (`from_stored`, the initialisation: codebook,
codes, norms) and, optionally, the full-precision weight, which becomes the *latent* weight.
It has the same geometry as VQLinear (lines, vectors of `vector_len`, padding, orientation,
residual and outlier lines; see vq/layer.py) and computes with exactly the same functions
(`decode`, `assemble`), so once its float parameters are rounded to fp16 (`round_to_storage`)
its outputs are bit-identical to those of the VQLinear that `to_stored()` returns.

What is what during training:
  codebook C (K, d)          nn.Parameter (fp32). A codebook shared by several layers (scope
                             block/model) is one Parameter object held by all of them, so its
                             gradient is the sum over every member's vectors.
  res_codebook, outlier_codebook   the same, when the layer has them.
  norm_scale / norm_bias     nn.Parameter (the per-line or per-tensor normalisation).
  outlier_values, bias       nn.Parameter (fp16-stored continuous tensors).
  codes, res_codes, outlier_codes  integer buffers (int64): the discrete indices I.
  latent (n_reg, line_len)   nn.Parameter, the continuous latent of the regular lines in the
  latent_out (n_out, len)    *normalised* domain (what the codebook approximates), initialised
                             from the full-precision weight: (line - norm_bias) / norm_scale.
                             None when the layer has no latent (frozen indices).

Forward: Ŵ = assemble(C[I] (+ R[J]), outlier lines, norm) (+ LoRA B·A); the latent never
enters the value of the forward pass. With a latent, the regular lines are
C[I] + (Z - Z.detach()): the value is C[I] exactly, the gradient w.r.t. Z is the gradient
w.r.t. C[I] (the straight-through estimator) and the gradient w.r.t. C is exact (autograd
of the gather: the sum over each codeword's vectors).

Index update (`update_indices`): every vector of the latent takes its nearest codeword
(padded entries masked out; with a residual codebook: nearest main codeword, then nearest
residual codeword to the remainder, kept only if it brings the vector closer). With
`fraction` < 1 only the vectors whose change gains the most (largest decrease of the latent's
squared distance to its quantized value), at most ceil(fraction · n_vectors) of them, change:
PV-tuning's `max_code_change_per_step`, which keeps training stable. `reset_latent()` puts the
latent back on Ŵ (the "gradient" ablation: no persistent latent).

`to_stored()` returns a VQLinear (or VQLoRALinear) holding only codes, codebooks, norms and
biases rounded to fp16; the latent is dropped. Shared codebooks map to one fp16 tensor (pass
the same `stored` dict to every member), which the checkpoint writes and `count_bits` counts
once.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttvq_methods.registry import register_layer
from ttvq_methods.vq.codebook import to_vectors
from ttvq_methods.vq.kmeans import nearest
from ttvq_methods.vq.layer import CODEBOOKS, VQLinear, assemble, decode

# Float tensors of a VQ layer that training may change, grouped by role.
GROUPS = {
    "codebook": ("codebook", "res_codebook", "outlier_codebook"),
    "scale": ("norm_scale", "norm_bias"),
    "outliers": ("outlier_values",),
    "bias": ("bias",),
    "lora": ("lora_A", "lora_B"),
}


@register_layer
class VQLoRALinear(VQLinear):
    """VQLinear plus a stored low-rank adapter: W = VQ(W) + lora_B @ lora_A (both fp16 buffers,
    so their bits are counted like every other stored tensor)."""

    kind = "vq_lora"

    def __init__(self, *args, lora_rank: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
        self.lora_rank = lora_rank
        self.register_buffer("lora_A", torch.zeros(lora_rank, self.in_features, dtype=torch.float16))
        self.register_buffer("lora_B", torch.zeros(self.out_features, lora_rank, dtype=torch.float16))

    def dequantize(self) -> torch.Tensor:
        return super().dequantize() + self.float_param("lora_B") @ self.float_param("lora_A")

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "lora_rank": self.lora_rank}


def _vq_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "lora_rank"}


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().float().clone())


class TrainableVQ(nn.Module):
    def __init__(self, meta: dict[str, Any]):
        """Empty (zero) parameters of the geometry `meta` (VQLinear.meta()); use from_stored."""
        super().__init__()
        self.meta = dict(meta)
        g = VQLinear.from_meta(_vq_meta(meta))
        object.__setattr__(self, "geom", g)  # geometry only: not a child module, never trained
        self.in_features, self.out_features = g.in_features, g.out_features
        self.orientation, self.d, self.line_len, self.nv = g.orientation, g.vector_len, g.line_len, g.nv
        self.n_reg, self.n_outliers = g.n_reg, g.n_outliers
        self.lora_rank = int(meta.get("lora_rank", 0))
        self.shared = dict(g.shared)
        for name, buf in g.state_dict().items():
            if buf.is_floating_point():
                setattr(self, name, nn.Parameter(buf.float().clone()))
        for name in ("codes", "res_codes", "outlier_codes"):
            if name in g._buffers:
                n = g.n_reg if name != "outlier_codes" else g.n_outliers
                nv = g.nv if name != "outlier_codes" else g.nvo
                self.register_buffer(name, torch.zeros(n, nv, dtype=torch.long))
        if g.n_outliers:
            self.register_buffer("outlier_lines", torch.zeros(g.n_outliers, dtype=torch.long))
        if self.lora_rank:
            self.lora_A = nn.Parameter(torch.zeros(self.lora_rank, self.in_features))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.lora_rank))
        self.latent: nn.Parameter | None = None
        self.latent_out: nn.Parameter | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_stored(cls, q: VQLinear, weight: torch.Tensor | None = None, *, shared: dict | None = None,
                    lora_rank: int = 0, seed: int = 0) -> "TrainableVQ":
        """Trainable copy of a stored VQ layer. `weight` (out, in): the full-precision weight,
        which becomes the latent (None: no latent, indices stay fixed). `shared` maps
        id(fp16 buffer) -> Parameter, so buffers shared by several layers become one Parameter;
        pass the same dict for every layer of a model. lora_rank > 0 adds a fresh LoRA adapter
        (B = 0, so the layer's output is unchanged) unless q already has one."""
        meta = q.meta()
        if lora_rank and "lora_rank" not in meta:
            meta["lora_rank"] = lora_rank
        self = cls(meta)
        shared = {} if shared is None else shared
        for name, buf in q.state_dict().items():
            if not buf.is_floating_point():
                continue
            if name in CODEBOOKS and name in q.shared:
                p = shared.get(id(q._buffers[name]))
                if p is None:
                    p = shared[id(q._buffers[name])] = _param(buf)
                setattr(self, name, p)
            else:
                getattr(self, name).data.copy_(buf.float())
        u = q.unpacked()
        for name in ("codes", "res_codes", "outlier_codes", "outlier_lines"):
            if name in u:
                getattr(self, name).copy_(u[name])
        if self.lora_rank and not isinstance(q, VQLoRALinear):
            g = torch.Generator().manual_seed(seed)
            self.lora_A.data.copy_(torch.randn(self.lora_rank, self.in_features, generator=g) / math.sqrt(self.in_features))
        if weight is not None:
            self.init_latent(weight)
        return self.to(q.codebook.device)

    def _lines(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight (out, in) as normalised lines (n_lines, line_len)."""
        lines = weight.detach().float()
        lines = lines.T if self.orientation == "out" else lines
        scale = getattr(self, "norm_scale", None)
        nb = getattr(self, "norm_bias", None)
        if nb is not None:
            lines = lines - nb.detach()[:, None]
        if scale is not None:
            lines = lines / scale.detach()[:, None]
        return lines

    def _split(self, lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.n_outliers:
            return lines, None
        is_out = torch.zeros(lines.shape[0], dtype=torch.bool, device=lines.device)
        is_out[self.outlier_lines] = True
        return lines[~is_out], lines[self.outlier_lines]

    @torch.no_grad()
    def init_latent(self, weight: torch.Tensor) -> None:
        """The latent := the normalised full-precision weight (regular and codebook-coded
        outlier lines)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must be {(self.out_features, self.in_features)}, got {tuple(weight.shape)}")
        reg, out = self._split(self._lines(weight))
        self.latent = nn.Parameter(reg.contiguous().clone())
        self.latent_out = nn.Parameter(out.contiguous().clone()) if (out is not None and self.geom.outlier_codebook_size) else None

    @torch.no_grad()
    def reset_latent(self) -> None:
        """Latent := the current quantized lines (no memory of earlier steps)."""
        if self.latent is not None:
            self.latent.copy_(self._reg_hat())
        if self.latent_out is not None:
            self.latent_out.copy_(decode(self.outlier_codebook, self.outlier_codes, self.line_len))

    @torch.no_grad()
    def latent_weight(self) -> torch.Tensor | None:
        """The latent in the weight's own domain (out, in) (outlier lines without a latent take
        their quantized value), e.g. to carry it into a later stage via init_latent."""
        if self.latent is None:
            return None
        out = None
        if self.n_outliers:
            out = (self.latent_out if self.latent_out is not None else
                   decode(self.outlier_codebook, self.outlier_codes, self.line_len)
                   if self.geom.outlier_codebook_size else self.outlier_values)
        return assemble(self.latent.detach(), None if out is None else out.detach(),
                        getattr(self, "outlier_lines", None), getattr(self, "norm_scale", None),
                        getattr(self, "norm_bias", None), self.orientation).detach().clone()

    def drop_latent(self) -> None:
        self.latent = None
        self.latent_out = None

    # -- forward --------------------------------------------------------------------------------
    def _reg_hat(self) -> torch.Tensor:
        reg = decode(self.codebook, self.codes, self.line_len)
        if self.geom.res_codebook_size:
            reg = reg + decode(self.res_codebook, self.res_codes, self.line_len)
        return reg

    def dequantize(self) -> torch.Tensor:
        """Ŵ (out, in) in fp32; with a latent in training mode, its straight-through form."""
        reg = self._reg_hat()
        ste = self.training and torch.is_grad_enabled()
        if ste and self.latent is not None and self.latent.requires_grad:
            reg = reg + (self.latent - self.latent.detach())
        out = None
        if self.n_outliers:
            if self.geom.outlier_codebook_size:
                out = decode(self.outlier_codebook, self.outlier_codes, self.line_len)
                if ste and self.latent_out is not None and self.latent_out.requires_grad:
                    out = out + (self.latent_out - self.latent_out.detach())
            else:
                out = self.outlier_values
        w = assemble(reg, out, getattr(self, "outlier_lines", None), getattr(self, "norm_scale", None),
                     getattr(self, "norm_bias", None), self.orientation)
        if self.lora_rank:
            w = w + self.lora_B @ self.lora_A
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = getattr(self, "bias", None)
        return F.linear(x, self.dequantize().to(x.dtype), None if b is None else b.to(x.dtype))

    # -- parameters by role --------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"latent", "codebook", "scale", "outliers", "bias", "lora"} -> this layer's Parameters
        (shared codebooks appear in every member's list: dedupe by identity)."""
        out: dict[str, list[nn.Parameter]] = {k: [] for k in ("latent", *GROUPS)}
        for group, names in GROUPS.items():
            out[group] = [getattr(self, n) for n in names if isinstance(getattr(self, n, None), nn.Parameter)]
        out["latent"] = [p for p in (self.latent, self.latent_out) if p is not None]
        return out

    # -- index update ---------------------------------------------------------------------------
    @torch.no_grad()
    def update_indices(self, fraction: float = 1.0) -> dict:
        """Re-choose indices from the latent (see the module docstring). Returns
        {"n": vectors, "changed": vectors whose index changed}."""
        if self.latent is None:
            return {"n": 0, "changed": 0}
        n, changed = self._update_part(self.latent, self.codes, self.codebook,
                                       self.res_codes if self.geom.res_codebook_size else None,
                                       self.res_codebook if self.geom.res_codebook_size else None, fraction)
        if self.latent_out is not None:
            n2, c2 = self._update_part(self.latent_out, self.outlier_codes, self.outlier_codebook, None, None, fraction)
            n, changed = n + n2, changed + c2
        return {"n": n, "changed": changed}

    def _update_part(self, lat, codes, C, rcodes, R, fraction) -> tuple[int, int]:
        d = C.shape[1]
        x, mask = to_vectors(lat.detach().float(), d)
        Cf = C.detach().float()
        cur = codes.reshape(-1)
        m = torch.ones_like(x) if mask is None else mask

        def dist(q):
            return (((x - q) ** 2) * m).sum(1)

        new = nearest(x, Cf, mask)
        q_new = Cf[new]
        q_cur = Cf[cur]
        if R is not None:
            Rf = R.detach().float()
            rcur = rcodes.reshape(-1)
            q_cur = q_cur + Rf[rcur]
            rnew = nearest(x - q_new, Rf, mask)
            q_new = q_new + Rf[rnew]
        gain = dist(q_cur) - dist(q_new)
        move = gain > 0
        if R is None:
            move &= new != cur
        if fraction < 1.0:
            cap = math.ceil(fraction * x.shape[0])
            if int(move.sum()) > cap:
                keep = torch.topk(torch.where(move, gain, torch.full_like(gain, -1.0)), cap).indices
                move = torch.zeros_like(move)
                move[keep] = True
        cur[move] = new[move]
        if R is not None:
            rcur[move] = rnew[move]
            rcodes.copy_(rcur.view_as(rcodes))
        codes.copy_(cur.view_as(codes))
        return x.shape[0], int(move.sum())

    # -- storage --------------------------------------------------------------------------------
    @torch.no_grad()
    def round_to_storage(self) -> None:
        """Round every stored float parameter to fp16 (kept in fp32), so the layer computes what
        its stored form will."""
        for name, p in self.named_parameters(recurse=False):
            if name not in ("latent", "latent_out"):
                p.copy_(p.half().float())

    @torch.no_grad()
    def to_stored(self, stored: dict | None = None) -> VQLinear:
        """The stored layer: codes, codebooks, norms (and LoRA) at fp16; no latent. `stored` maps
        id(shared Parameter) -> fp16 tensor; pass the same dict for every layer of a scope."""
        stored = {} if stored is None else stored
        cls = VQLoRALinear if self.lora_rank else VQLinear
        meta = dict(self.meta)
        meta.pop("lora_rank", None)
        q = cls(**meta, **({"lora_rank": self.lora_rank} if self.lora_rank else {}))
        for name, t in q.state_dict().items():
            if not t.is_floating_point():
                continue
            p = getattr(self, name)
            if name in CODEBOOKS and name in self.shared:
                h = stored.get(id(p))
                if h is None:
                    h = stored[id(p)] = p.detach().half().clone()
                q.share(name, h, self.shared[name])
            else:
                q._buffers[name].copy_(p.detach().half())
        q.set_codes(self.codes, getattr(self, "res_codes", None),
                    getattr(self, "outlier_lines", None), getattr(self, "outlier_codes", None),
                    self.outlier_values.detach() if hasattr(self, "outlier_values") else None)
        return q.to(self.codebook.device)

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, d={self.d}, K={self.geom.codebook_size}, "
                f"latent={self.latent is not None}, lora={self.lora_rank}")
