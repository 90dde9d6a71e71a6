"""GPTQ (Frantar et al., 2023; reference IST-DASLab/gptq `gptq.py`/`quant.py`): the OBS column
loop of second_order.py with the uniform grid of scalar.py as its column quantizer. The result
is stored as a plain `ScalarQuantLinear`, so it reloads and runs like RTN. Deviations from the
reference, each on purpose, are listed in docs/methods/gptq.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ttvq_bench.errors import QuantizationError
from ttvq_methods.base import Method, check_ranges
from ttvq_methods.registry import METHODS
from ttvq_methods.scalar import ScalarQuantLinear, ScaleDType, n_groups_for, quant_params, quantize_to_codes
from ttvq_methods.second_order import obs_quantize, prepare_hessian

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
    scale_dtype: ScaleDType = ScaleDType.float16  # float32: the reference's (counted at 32 bits)


@dataclass
class GPTQResult:
    Q: torch.Tensor  # (m, k) fp32, the dequantized weight GPTQ computed, original column order
    codes: torch.Tensor  # (m, k) integer-valued
    scales: torch.Tensor  # (m, G) fp16-exact fp32
    zeros: torch.Tensor  # (m, G)
    g_idx: torch.Tensor  # (k,) group of each column


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False,
                  act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
                  blocksize: int = 128, name: str = "", scale_dtype: str = "float16") -> GPTQResult:
    m, k = W.shape
    who = f"gptq {name}"
    W, H = prepare_hessian(W, H, who)
    G = n_groups_for(k, group_size)
    gs = k if G == 1 else group_size
    dynamic = G > 1 and not static_groups  # grids fitted at group starts, in processing order
    scales = torch.empty(m, G, device=W.device)
    zeros = torch.empty(m, G, device=W.device)
    if not dynamic:  # one grid per row, or static groups: fitted to the original weight
        for g in range(G):
            scales[:, g], zeros[:, g] = quant_params(W[:, g * gs : (g + 1) * gs], bits, sym, scale_dtype)

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    # group of the column at each processing position
    group_at = perm // gs if perm is not None and not dynamic else torch.arange(k, device=W.device) // gs
    codes = torch.zeros_like(W)

    def quantize_column(c: int, w: torch.Tensor, ahead) -> torch.Tensor:
        if dynamic and c % gs == 0:  # the group's grid, from its columns with every update so far
            scales[:, c // gs], zeros[:, c // gs] = quant_params(ahead(min(c + gs, k)), bits, sym, scale_dtype)
        g = int(group_at[c])
        q = quantize_to_codes(w, scales[:, g], zeros[:, g], bits)
        codes[:, c] = q
        return scales[:, g] * (q - zeros[:, g])

    obs_quantize(W, H, quantize_column, percdamp=percdamp, blocksize=blocksize, who=who, order=perm)
    if perm is not None:
        invperm = torch.argsort(perm)
        codes, g_idx = codes[:, invperm], group_at[invperm]
    else:
        g_idx = group_at
    Q = scales[:, g_idx] * (codes - zeros[:, g_idx])  # the expression dequantize() evaluates
    if not torch.isfinite(Q).all():
        raise QuantizationError(f"gptq {name}: result contains NaN/Inf")
    return GPTQResult(Q=Q, codes=codes, scales=scales, zeros=zeros, g_idx=g_idx)


@METHODS.register("gptq")
class GPTQ(Method):
    Config = GPTQConfig
    needs_hessian = True
    parallel_layers = True
    supported_bits = tuple(range(1, 9))

    def __init__(self, cfg, bits: int):
        super().__init__(cfg, bits)
        check_ranges(cfg, self.name, group_size="-1 or >= 1", percdamp=">= 0", blocksize=">= 1")

    @property
    def true_sequential(self) -> bool:
        return self.cfg.true_sequential

    def quantize_layer(self, name: str, layer: nn.Linear, H: torch.Tensor | None) -> nn.Module:
        c = self.cfg
        r = gptq_quantize(layer.weight.data, H, self.bits, c.group_size, c.sym, c.act_order,
                          c.static_groups, c.percdamp, c.blocksize, name=name, scale_dtype=str(c.scale_dtype))
        q = ScalarQuantLinear.from_codes(r.codes, r.scales, r.zeros, self.bits, c.group_size, c.sym,
                                         g_idx=r.g_idx, bias=layer.bias, scale_dtype=str(c.scale_dtype))
        return q.to(layer.weight.device)
