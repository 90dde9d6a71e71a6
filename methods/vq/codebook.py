"""Codebook scope: one codebook per linear ("layer"), per decoder block ("block") or for the
whole model ("model"), and the helpers every VQ method uses to cut weights into vectors and
fit codebooks on them.

Why scopes: a per-layer fp16 codebook costs K·d·16 bits whatever the layer's size. On a
4096x4096 layer K=4096, d=6 is 0.02 bpw (the papers' setting); on stories260K's 64x64 layers
it is 6 bpw, more than the indices. Sharing one codebook across a block or the model divides
that cost by the number of weights sharing it. The record shows the cost either way: a shared
codebook is one tensor (stored and counted once), a per-layer one is counted per layer.

Fitting a shared codebook needs every member's weights and importances before the first
member is quantized. Weights are known up front; Hessians are not (the block loop builds them
true-sequentially). We chose: before the block loop, run the *full-precision* model once over
the calibration inputs and keep diag(XᵀX/n) of every linear (`second_order.fp_hessians`,
a vector per linear, not the full Hessian); shared codebooks are fitted on those. Each member's importances
are divided by their mean, so every layer weighs in per weight, not by its activation scale
(no principled cross-layer weighting exists: each layer's proxy loss is in its own units).
The layers are then quantized as usual, with their true-sequential Hessians, against the
fixed shared codebook.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ttvq_bench.choices import Choice
from ttvq_bench.errors import QuantizationError
from ttvq_methods.model_walk import block_of
from ttvq_methods.vq.kmeans import KMeansResult, kmeans
from ttvq_methods.vq.layer import VQLinear


class CodebookScope(Choice):
    auto = "auto"  # resolved from the bits budget and the model's layer sizes (vq/budget.py)
    layer = "layer"  # one codebook per linear (the papers' setting for 4096-wide layers)
    block = "block"  # one per decoder block
    model = "model"  # one for the whole model


def scope_key(scope: str, full_name: str) -> str | None:
    """Which shared codebook a linear uses: None (its own), "model.layers.<b>" or "model"."""
    scope = CodebookScope(scope)
    if scope == "auto":
        raise ValueError("codebook scope 'auto' is resolved before layers are quantized")
    if scope == "layer":
        return None
    if scope == "model":
        return "model"
    return block_of(full_name)


def vector_weights(line_w: torch.Tensor, line_len: int, d: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-line importances (L,) -> k-means weights: (L·nv,) or, with padding, (L·nv, d)."""
    nv = math.ceil(line_len / d)
    w = line_w.float().repeat_interleave(nv)
    return w if mask is None else w[:, None] * mask


def fit_codebook(vectors: torch.Tensor, weights: torch.Tensor | None, K: int, *, iters: int, tol: float,
                 init: str, seed: int) -> tuple[torch.Tensor, KMeansResult]:
    """k-means, then the centroids rounded to fp16 (what is stored; codes are chosen later
    against these rounded values)."""
    r = kmeans(vectors, K, weights, iters=iters, tol=tol, init=init, seed=seed)
    return r.centroids.half(), r


def pooled(members: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate members' (vectors, weights), each member's weights scaled to mean 1 per
    real entry, so that every layer counts per weight (see the module docstring)."""
    vs, ws = [], []
    per_entry = any(w.dim() == 2 for _, w in members)
    for v, w in members:
        if per_entry and w.dim() == 1:
            w = w[:, None].expand(-1, v.shape[1])
        scale = (w > 0).sum().float() / w.sum().clamp_min(1e-30)
        vs.append(v)
        ws.append(w * scale)
    return torch.cat(vs), torch.cat(ws)


def tie_shared(model: nn.Module) -> int:
    """Make VQ layers whose meta names the same shared codebook hold one tensor again (after a
    resume loaded blocks from separate files). Returns how many buffers were re-tied; raises if
    two layers claim the same shared codebook with different values."""
    first: dict[tuple[str, str], torch.Tensor] = {}
    n = 0
    for mod in model.modules():
        if not isinstance(mod, VQLinear):
            continue
        for name, scope in mod.shared.items():
            if name not in mod.codebook_names:
                continue
            t = mod._buffers[name]
            ref = first.setdefault((scope, name), t)
            if ref is t:
                continue
            if ref.shape != t.shape or not torch.equal(ref, t):
                raise QuantizationError(f"shared {name} of scope {scope!r} differs between layers")
            if ref.data_ptr() != t.data_ptr():
                mod._buffers[name] = ref
                mod.clear_cache()
                n += 1
    return n
