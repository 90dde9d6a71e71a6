"""`bits` is a budget for the record's bpw: a VQ method resolves its shape (codebook scope,
vector length d, codebook sizes) from it and the model's real layer sizes with one rule.

The rule. Candidates are every scope (layer, block, model; or the one configured), d in
2..12 and codebook sizes K (and a residual codebook's Kr) that are powers of two up to
`max_codebook_size` (4096 by default, VPTQ's). Each candidate's bpw is computed exactly, from
the stored form itself: VQLinear layers of the model's shapes built on the meta device (no
memory), every buffer counted (codes with their padding, codebooks once per scope, norms,
outliers, biases). Feasible candidates have a nominal index rate sum(log2 K)/d of at most
`bits` and a bpw of at most `bits + BUDGET_SLACK`. Among them the resolved shape has
  1. the highest index rate (the budget spent on indices),
  2. then the longest vectors (VQ's advantage grows with d),
  3. then the most specific scope (layer before block before model: codebooks fitted closer to
     their weights),
  4. then the lowest bpw.
When nothing is feasible (a budget too small for this model's layers), the candidate with the
lowest bpw is taken and the result is marked over budget. Values set in the config (scope, d,
K, Kr) are kept as given; a shape set entirely by hand may exceed the budget (research), and
is marked over budget when it does.

BUDGET_SLACK is 0.35 bpw: on a model as small as stories260K (45K weights per block) a useful
codebook alone costs ~0.1 bpw and per-column scales ~0.2; on 7B-70B shapes the rule lands
within 0.05 (tests/test_budget.py computes every case from shapes alone).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ttvq_bench.errors import ConfigError
from ttvq_methods.model_walk import decoder_layers, linears
from ttvq_methods.vq.layer import VQLinear, index_bits

BUDGET_SLACK = 0.35
MAX_CODEBOOK_SIZE = 4096
VECTOR_LENS = tuple(range(2, 13))
SCOPES = ("layer", "block", "model")  # most specific first
NORM_BY_SCOPE = {"layer": "line", "block": "tensor", "model": "tensor"}  # norm "scope"
# scope -> (d_o, K_o) of the outlier codebook: paper Tab. 8 "1% at v4/k8192" for per-layer
# codebooks; 4 bits per outlier weight for shared ones (an 8192x4 codebook alone would cost
# 0.23 bpw on stories260K).
OUTLIERS = {"layer": (4, 8192), "block": (2, 256), "model": (2, 256)}


@dataclass(frozen=True)
class LinearShape:
    block: int
    out_features: int
    in_features: int
    has_bias: bool = False


@dataclass(frozen=True)
class VQSpec:
    vector_len: int
    codebook_size: int
    res_codebook_size: int = 0  # 0: no residual codebook
    outlier_percent: float = 0.0
    outlier_vector_len: int = 0
    outlier_codebook_size: int = 0  # 0 with outliers: outlier lines stored in fp16

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.codebook_size] + ([self.res_codebook_size] if self.res_codebook_size else [])

    @property
    def index_bpw(self) -> float:
        """Nominal index bits per weight of the regular lines (no padding, no codebooks)."""
        return sum(index_bits(k) for k in self.codebook_sizes) / self.vector_len


@dataclass(frozen=True)
class Resolved:
    spec: VQSpec
    scope: str
    norm: str
    bpw: float  # of the decoder-block linears, exactly as they will be stored
    over_budget: bool


def model_shapes(model: nn.Module) -> list[LinearShape]:
    return [LinearShape(b, lin.out_features, lin.in_features, lin.bias is not None)
            for b, block in enumerate(decoder_layers(model)) for lin in linears(block).values()]


def n_outlier_columns(percent: float, n: int) -> int:
    return min(n - 1, math.ceil(percent / 100 * n)) if percent > 0 else 0


def stored_bpw(shapes: list[LinearShape], spec: VQSpec, scope: str, norm: str, norm_bias: bool) -> float:
    """bpw of these linears stored as VQLinear (orientation "out": lines are input columns),
    a shared codebook counted once per scope group, from meta-device layers (no memory)."""
    bits = weights = 0
    shared = 0
    with torch.device("meta"):
        for (out, inp, bias), count in Counter((s.out_features, s.in_features, s.has_bias) for s in shapes).items():
            n_out = n_outlier_columns(spec.outlier_percent, inp)
            q = VQLinear(inp, out, spec.vector_len, spec.codebook_sizes, "out", n_out,
                         spec.outlier_vector_len if n_out and spec.outlier_codebook_size else 0,
                         spec.outlier_codebook_size if n_out else 0, norm, norm_bias, bias)
            bits += q.stored_bits() * count
            weights += out * inp * count
            shared = sum(q.bits_breakdown()[n] for n in q.codebook_names)  # the same for every shape
    groups = {"layer": len(shapes), "block": len({s.block for s in shapes}), "model": 1}[scope]
    return (bits - (len(shapes) - groups) * shared) / weights


def resolve(bits: int, shapes: list[LinearShape], *, scope: str = "auto", norm: str = "scope",
            norm_bias: bool = False, residual: bool = False, vector_len: int = 0, codebook_size: int = 0,
            res_codebook_size: int = 0, outlier_percent: float = 0.0, outlier_vector_len: int = 0,
            outlier_codebook_size: int = 0, max_codebook_size: int = MAX_CODEBOOK_SIZE) -> Resolved:
    """The shape `bits` buys on these layers (see the module docstring). outlier_codebook_size
    0: the scope's default, -1: outlier columns kept in fp16."""
    if not shapes:
        raise ConfigError("the model has no decoder-block linears to quantize")
    sizes = [2**k for k in range(2, int(math.log2(max_codebook_size)) + 1)]
    by_hand = bool(vector_len and codebook_size and (res_codebook_size or not residual) and scope != "auto")
    best, cheapest = None, None
    for sc in (SCOPES if scope == "auto" else (str(scope),)):
        nm = NORM_BY_SCOPE[sc] if norm == "scope" else str(norm)
        do, Ko = OUTLIERS[sc]
        Ko = 0 if outlier_codebook_size == -1 else (outlier_codebook_size or Ko)
        for d in ([vector_len] if vector_len else VECTOR_LENS):
            for K in ([codebook_size] if codebook_size else sizes):
                for Kr in (([res_codebook_size] if res_codebook_size else sizes) if residual else [0]):
                    spec = VQSpec(d, K, Kr, outlier_percent, (outlier_vector_len or do) if outlier_percent else 0,
                                  Ko if outlier_percent else 0)
                    rate = spec.index_bpw
                    if rate > bits and not by_hand:
                        continue
                    bpw = stored_bpw(shapes, spec, sc, nm, norm_bias)
                    cand = Resolved(spec, sc, nm, bpw, bpw > bits + BUDGET_SLACK)
                    if cheapest is None or bpw < cheapest.bpw:
                        cheapest = cand
                    if bpw > bits + BUDGET_SLACK:
                        continue
                    key = (rate, d, -SCOPES.index(sc), -bpw)
                    if best is None or key > best[0]:
                        best = (key, cand)
    if best is not None:
        return best[1]
    if cheapest is None:
        raise ConfigError(f"no VQ shape has an index rate of at most {bits} bits per weight")
    return cheapest
