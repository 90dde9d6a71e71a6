"""GPTQ (Frantar et al., 2023; reference IST-DASLab/gptq `gptq.py`/`quant.py`).

Columns are quantized one at a time on the uniform grid of `scalar.py`; each column's rounding
error is spread over the not yet quantized columns through the upper Cholesky factor of H⁻¹,
with updates applied lazily per block of `blocksize` columns. The result is stored as a plain
`ScalarQuantLinear`, so it reloads and runs like RTN.

Deviations from the reference, each on purpose:
  * scales are rounded to fp16 before codes are chosen (see scalar.py), so stored == computed;
  * with groups (not static), a group's (scale, zero) is fitted to the group's columns *with all
    error updates so far applied*; the reference reads the outer W, whose columns inside the
    current block lack the in-block updates, so its grid depended on blocksize. Here the result
    is independent of blocksize (up to fp32 summation order);
  * the Cholesky is done in float64 and retried with 10x, 100x damping before giving up;
  * act_order's sort is stable, so ties (e.g. H = I) keep column order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ttvq_bench.errors import QuantizationError
from ttvq_methods.base import Method
from ttvq_methods.registry import register_method
from ttvq_methods.scalar import ScalarQuantLinear, n_groups_for, quant_params, quantize_to_codes

log = logging.getLogger(__name__)

DAMP_RETRIES = 2  # after percdamp fails: try 10x and 100x (0.01 -> 0.1 -> 1.0 of mean diag)


@dataclass
class GPTQConfig:
    name: str = "gptq"
    group_size: int = -1
    sym: bool = False
    act_order: bool = False  # quantize columns by decreasing diag(H)
    static_groups: bool = False  # with act_order: fit group grids up front, in column order
    percdamp: float = 0.01  # damping added to diag(H), relative to mean(diag(H))
    blocksize: int = 128  # lazy-update block width: speed only, not the result
    true_sequential: bool = True  # consumed by the block loop (Hessians after earlier sublayers)


@dataclass
class GPTQResult:
    Q: torch.Tensor  # (m, k) fp32, the dequantized weight GPTQ computed, original column order
    codes: torch.Tensor  # (m, k) integer-valued
    scales: torch.Tensor  # (m, G) fp16-exact fp32
    zeros: torch.Tensor  # (m, G)
    g_idx: torch.Tensor  # (k,) group of each column


def _hinv_upper(H: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)⁻¹, i.e. U with Uᵀ U = (H + damp I)⁻¹."""
    k = H.shape[0]
    idx = torch.arange(k, device=H.device)
    mean_diag = H.diagonal().mean()
    rels = [percdamp] + [max(percdamp, 1e-3) * 10**a for a in range(1, DAMP_RETRIES + 1)]
    for rel in rels:
        Hd = H.clone()
        Hd[idx, idx] += rel * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U
        log.warning("gptq %s: Cholesky failed with damping %.3g x mean(diag H); retrying with more", name, rel)
    raise QuantizationError(f"gptq {name}: Hessian not positive definite even with damping {rels[-1]:g} x mean(diag)")


def _group_columns(W, W1, Err1, Hinv, i1, i, i2, end):
    """Columns [i1+i, end) of the weight with every error update so far applied.

    Inside the block they are in W1; past it, W still lacks the updates from this block's
    columns i1..i1+i-1, which are added here (the lazy update would add them at block end)."""
    c = i1 + i
    inside = W1[:, i : min(end, i2) - i1]
    if end <= i2:
        return inside
    outside = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:c, i2:end]
    return torch.cat([inside, outside], dim=1)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False,
                  act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
                  blocksize: int = 128, name: str = "") -> GPTQResult:
    m, k = W.shape
    if H is None or tuple(H.shape) != (k, k):
        raise QuantizationError(f"gptq {name}: needs an input Hessian of shape {(k, k)}, got {None if H is None else tuple(H.shape)}")
    W = W.detach().float().clone()
    H = H.detach().to(W.device, torch.float64).clone()
    if not torch.isfinite(W).all() or not torch.isfinite(H).all():
        raise QuantizationError(f"gptq {name}: weight or Hessian contains NaN/Inf")

    # Columns no calibration input ever touched: their weight cannot matter, set it to 0.
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    G = n_groups_for(k, group_size)
    gs = k if G == 1 else group_size
    dynamic = G > 1 and not static_groups  # grids fitted at group starts, in processing order
    scales = torch.empty(m, G, device=W.device)
    zeros = torch.empty(m, G, device=W.device)
    if not dynamic:  # one grid per row, or static groups: fitted to the original weight
        for g in range(G):
            scales[:, g], zeros[:, g] = quant_params(W[:, g * gs : (g + 1) * gs], bits, sym)

    perm = torch.arange(k, device=W.device)
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    # group of the column at each processing position
    group_at = perm // gs if not dynamic else torch.arange(k, device=W.device) // gs

    Hinv = _hinv_upper(H, percdamp, name).float()
    codes = torch.zeros_like(W)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if dynamic and c % gs == 0:
                cols = _group_columns(W, W1, Err1, Hinv, i1, i, i2, min(c + gs, k))
                scales[:, c // gs], zeros[:, c // gs] = quant_params(cols, bits, sym)
            g = int(group_at[c])
            w = W1[:, i]
            q = quantize_to_codes(w, scales[:, g], zeros[:, g], bits)
            codes[:, c] = q
            err = (w - scales[:, g] * (q - zeros[:, g])) / Hinv1[i, i]
            W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    codes, g_idx = codes[:, invperm], group_at[invperm]
    Q = scales[:, g_idx] * (codes - zeros[:, g_idx])  # the expression dequantize() evaluates
    if not torch.isfinite(Q).all():
        raise QuantizationError(f"gptq {name}: result contains NaN/Inf")
    return GPTQResult(Q=Q, codes=codes, scales=scales, zeros=zeros, g_idx=g_idx)


@register_method("gptq", GPTQConfig)
class GPTQ(Method):
    needs_hessian = True
    supported_bits = tuple(range(1, 9))

    def quantize_layer(self, name: str, layer: nn.Linear, H: torch.Tensor | None) -> nn.Module:
        c = self.cfg
        r = gptq_quantize(layer.weight.data, H, self.bits, c.group_size, c.sym, c.act_order,
                          c.static_groups, c.percdamp, c.blocksize, name=name)
        q = ScalarQuantLinear.from_codes(r.codes, r.scales, r.zeros, self.bits, c.group_size, c.sym,
                                         g_idx=r.g_idx, bias=layer.bias)
        return q.to(layer.weight.device)
