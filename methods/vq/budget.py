"""`bits` is a budget for the record's bpw: a VQ method resolves its shape (codebook scope,
vector length d, number of codebooks M and their sizes) from it and the model's real layer
sizes with one rule.

The rule. Candidates are every scope (layer, block, model; or the one configured), d in
`vector_lens` (2..12 by default) and codebook sizes that are powers of two up to
`max_codebook_size` (4096 by default, VPTQ's): one codebook of K entries, or a main and a
residual codebook (K, Kr) (VPTQ's `residual`), or M additive codebooks of 2^B entries each
(AQLM: M in 1..`max_codebooks` when `num_codebooks` is 0). Each candidate's bpw is computed
exactly, from the stored form itself: VQLinear layers of the model's shapes built on the meta
device (no memory) in the method's orientation ("out": vectors along output rows of an input
column, VPTQ; "in": vectors along the inputs of an output row, AQLM), every buffer counted
(codes with their padding, codebooks once per scope, norms, outliers, biases). Feasible
candidates have a nominal index rate sum(log2 K_m)/d of at most `bits` and a bpw of at most
`bits + BUDGET_SLACK`. Among them the resolved shape has
  1. the highest index rate (the budget spent on indices),
  2. then the longest vectors (VQ's advantage grows with d),
  3. then the fewest codebooks (one codebook of 2^(M·B) entries can hold every sum of M
     codebooks of 2^B entries: fewer, larger codebooks are at least as expressive and cheaper
     to search; VPTQ's M is fixed by `residual`, so this never decides for it),
  4. then the most specific scope (layer before block before model: codebooks fitted closer to
     their weights),
  5. then the lowest bpw.
When nothing is feasible (a budget too small for this model's layers), the candidate with the
lowest bpw is taken and the result is marked over budget. Values set in the config (scope, d,
K, Kr, M) are kept as given; a shape set entirely by hand may exceed the budget (research), and
is marked over budget when it does.

BUDGET_SLACK is 0.35 bpw: on a model as small as stories260K (45K weights per block) a useful
codebook alone costs ~0.1 bpw and per-column scales ~0.2; on 7B-70B shapes the rule lands
within 0.05 for VPTQ (tests/test_budget.py computes every case from shapes alone). AQLM's
1x16 g8 on Llama-2-7B costs 2.294 bpw at 2 bits (its 2^16-entry codebooks; the paper's ~2.29),
its 2x8 g8 (num_codebooks=2) 2.006 (the paper's ~2.02).
"""
from __future__ import annotations

import functools
import math
from collections import Counter
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ttvq_bench.errors import ConfigError
from ttvq_methods.model_walk import decoder_layers, linears
from ttvq_methods.vq.layer import VQLinear, index_bits

BUDGET_SLACK = 0.35
MAX_CODEBOOK_SIZE = 4096
VECTOR_LENS = tuple(range(2, 13))
MAX_CODEBOOKS = 8  # additive codebooks (AQLM) the rule considers when M is resolved
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
    num_codebooks: int = 1  # M additive codebooks of codebook_size entries each (AQLM: M x log2 K, g = vector_len)

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.codebook_size] * self.num_codebooks + ([self.res_codebook_size] if self.res_codebook_size else [])

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

    def report(self, bits: int) -> dict:
        """The record's `method_report.shape`."""
        return {**dataclasses.asdict(self.spec), "index_bpw": self.spec.index_bpw, "codebook_scope": self.scope,
                "norm": self.norm, "bpw": self.bpw, "over_budget": self.over_budget, "bits": bits}


def model_shapes(model: nn.Module) -> list[LinearShape]:
    return [LinearShape(b, lin.out_features, lin.in_features, lin.bias is not None)
            for b, block in enumerate(decoder_layers(model)) for lin in linears(block).values()]


def n_outlier_columns(percent: float, n: int) -> int:
    return min(n - 1, math.ceil(percent / 100 * n)) if percent > 0 else 0


def stored_bpw(shapes: list[LinearShape], spec: VQSpec, scope: str, norm: str, norm_bias: bool,
               orientation: str = "out") -> float:
    """bpw of these linears stored as VQLinear (orientation "out": lines are input columns;
    "in": lines are output rows), a shared codebook counted once per scope group, from
    meta-device layers (no memory)."""
    bits = weights = 0
    shared = 0
    for (out, inp, bias), count in Counter((s.out_features, s.in_features, s.has_bias) for s in shapes).items():
        b, shared = _layer_bits(out, inp, bias, spec, norm, norm_bias, orientation)  # shared: the same for every shape
        bits += b * count
        weights += out * inp * count
    groups = {"layer": len(shapes), "block": len({s.block for s in shapes}), "model": 1}[scope]
    return (bits - (len(shapes) - groups) * shared) / weights


@functools.lru_cache(maxsize=1 << 16)
def _layer_bits(out: int, inp: int, bias: bool, spec: VQSpec, norm: str, norm_bias: bool,
                orientation: str) -> tuple[int, int]:
    """(stored bits of one such VQLinear, bits of its codebooks), from a meta-device layer.
    Cached: the rule asks for the same layer under several scopes and budgets."""
    with torch.device("meta"):
        n_out = n_outlier_columns(spec.outlier_percent, inp if orientation == "out" else out)
        q = VQLinear(inp, out, spec.vector_len, spec.codebook_sizes, orientation, n_out,
                     spec.outlier_vector_len if n_out and spec.outlier_codebook_size else 0,
                     spec.outlier_codebook_size if n_out else 0, norm, norm_bias, bias)
        return q.stored_bits(), sum(q.bits_breakdown()[n] for n in q.codebook_names)


def resolve(bits: int, shapes: list[LinearShape], *, scope: str = "auto", norm: str = "scope",
            norm_bias: bool = False, residual: bool = False, vector_len: int = 0, codebook_size: int = 0,
            res_codebook_size: int = 0, outlier_percent: float = 0.0, outlier_vector_len: int = 0,
            outlier_codebook_size: int = 0, max_codebook_size: int = MAX_CODEBOOK_SIZE,
            orientation: str = "out", num_codebooks: int = 1, max_codebooks: int = MAX_CODEBOOKS,
            vector_lens: tuple[int, ...] = VECTOR_LENS) -> Resolved:
    """The shape `bits` buys on these layers (see the module docstring). outlier_codebook_size
    0: the scope's default, -1: outlier columns kept in fp16. num_codebooks 0: M resolved in
    1..max_codebooks (equal sizes); vector_lens: the d the rule may choose."""
    if not shapes:
        raise ConfigError("the model has no decoder-block linears to quantize")
    sizes = [2**k for k in range(2, int(math.log2(max_codebook_size)) + 1)]
    by_hand = bool(vector_len and codebook_size and num_codebooks and (res_codebook_size or not residual)
                   and scope != "auto")
    cands = []
    for sc in (SCOPES if scope == "auto" else (str(scope),)):
        nm = NORM_BY_SCOPE[sc] if norm == "scope" else str(norm)
        do, Ko = OUTLIERS[sc]
        Ko = 0 if outlier_codebook_size == -1 else (outlier_codebook_size or Ko)
        for d in ([vector_len] if vector_len else vector_lens):
            for M in ([num_codebooks] if num_codebooks else range(1, max_codebooks + 1)):
                for K in ([codebook_size] if codebook_size else sizes):
                    for Kr in (([res_codebook_size] if res_codebook_size else sizes) if residual else [0]):
                        spec = VQSpec(d, K, Kr, outlier_percent, (outlier_vector_len or do) if outlier_percent else 0,
                                      Ko if outlier_percent else 0, M)
                        rate = spec.index_bpw
                        if rate > bits and not by_hand:
                            continue
                        bpw = stored_bpw(shapes, spec, sc, nm, norm_bias, orientation)
                        cands.append((rate, (d, -len(spec.codebook_sizes), -SCOPES.index(sc)), bpw, (spec, sc, nm)))
    picked = select(bits, cands)
    if picked is None:
        raise ConfigError(f"no VQ shape has an index rate of at most {bits} bits per weight")
    (spec, sc, nm), bpw, over = picked
    return Resolved(spec, sc, nm, bpw, over)


def select(bits: int, candidates: Iterable[tuple[float, tuple, float, Any]]) -> tuple[Any, float, bool] | None:
    """The rule's choice among candidates (rate, prefer, bpw, shape) of any stored form: `rate`
    the nominal index bits per weight (callers drop rate > bits unless the shape is set by
    hand), `prefer` a tuple whose larger values are wanted first (VQLinear: d, fewer codebooks,
    a more specific scope; JLCM, methods/jlcm.py: d, more groups), `bpw` exact from the stored
    form. Feasible: bpw <= bits + BUDGET_SLACK; the best has the highest (rate, *prefer, -bpw),
    the first on ties. Nothing feasible: the cheapest, over budget. Returns (shape, bpw,
    over_budget); None without candidates."""
    best = cheapest = None
    for rate, prefer, bpw, shape in candidates:
        if cheapest is None or bpw < cheapest[1]:
            cheapest = (shape, bpw)
        if bpw > bits + BUDGET_SLACK:
            continue
        key = (rate, *prefer, -bpw)
        if best is None or key > best[0]:
            best = (key, shape, bpw)
    if best is not None:
        return best[1], best[2], False
    return None if cheapest is None else (cheapest[0], cheapest[1], True)
