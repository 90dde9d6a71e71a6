"""`bits` -> VQ shape: (vector length d, codebook size K, residual codebook size Kr), per method
and codebook scope. Every entry is overridable from the method config; the record reports the
bpw actually stored (codes, codebooks, norms, outliers, padding), never this table's nominal
index rate log2(K)/d + log2(Kr)/d.

VPTQ, codebook_scope "layer" (one codebook per linear: the paper's setting, sized for
4096-wide layers; with 4096x4096 the codebook overhead is K·d·16/(4096²)):

  bits  residual  d   K      Kr     index bpw  +codebook (4096²)  source
  2     no        6   4096   -      2.000      +0.023 -> 2.02     paper Tab. 8 "v6 k4096" (2.02)
  2     yes       12  4096   4096   2.000      +0.094 -> 2.09     paper Tab. 8 "v12, k1=k2=4096"
  3     no        4   4096   -      3.000      +0.016 -> 3.02     paper 3-bit rows (3.02)
  3     yes       8   65536  256    3.000      +0.50  -> 3.50*    algorithm.md example (~3 bit)
  4     no        3   4096   -      4.000      +0.012             our choice (paper: not stated)
  4     yes       6   4096   4096   4.000      +0.047             our choice (paper: not stated)
  (* 65536x8 fp16 is 8.4 Mbit: 0.19 bpw on 4096x11008, 0.08 averaged over a Llama-2-7B block)

VPTQ, codebook_scope "block" / "model" (one codebook for all linears of a decoder block / of the
whole model). Chosen for small models, where a per-layer codebook costs more bits than the
indices (stories260K: K=256, d=4 in fp16 is 16,384 bits = 4 bpw on a 64x64 layer). The numbers
are for stories260K (45,312 block-linear weights per block, 226,560 in all; out dims 64/32/172):

  scope  bits  residual  d  K     Kr   index bpw  codebooks  ~total (norm tensor, no outliers)
  model  2     no        4  256   -    2.000      0.072      2.07
  model  2     yes       6  64    64   2.060*     0.054      2.12
  model  3     no        3  512   -    3.065*     0.108      3.17
  model  3     yes       4  256   16   3.000      0.077      3.08
  model  4     no        2  256   -    4.000      0.036      4.04
  model  4     yes       4  256   256  4.000      0.145      4.15
  block  2     no        3  64    -    2.043*     0.068      2.11
  block  2     yes       4  16    16   2.000      0.045      2.05
  block  3     no        2  64    -    3.000      0.045      3.05
  block  3     yes       4  64    64   3.000      0.181      3.18
  block  4     no        2  256   -    4.000      0.181      4.18
  block  4     yes       2  16    16   4.000      0.023      4.02
  (* d=3 pads 64 -> 66, 32 -> 33, 172 -> 174 rows, d=6 pads 64 -> 66, 32 -> 36, 172 -> 174:
     the padded vectors' indices are stored and counted)

With per-line scales ("line" norm: one fp16 scale per input column, 0.20 bpw on stories260K's
64-row outputs) the model scope's index budget shrinks, so it has its own rows (TTVQ's shapes):

  scope  bits  d  K    index bpw  + codebook + scales + padding
  model  2     4  256  2.000      2.27
  model  3     3  256  2.667      2.98

Outliers (outlier_percent > 0): the most important lines (largest s²·H_jj) get their own
codebook of (d_o, K_o): "layer" scope (4, 8192) as in paper Tab. 8 ("1% at v4/k8192"); shared
scopes (2, 256), i.e. 4 bits per outlier weight, since a shared 8192x4 codebook alone would
cost 0.23 bpw on stories260K. outlier_codebook_size -1 keeps outlier lines in fp16.
"""
from __future__ import annotations

from dataclasses import dataclass

from ttvq_bench.errors import ConfigError
from ttvq_methods.vq.layer import index_bits

# (scope, bits, residual) -> (d, K, Kr)
VPTQ_TABLE: dict[tuple[str, int, bool], tuple[int, int, int]] = {
    ("layer", 2, False): (6, 4096, 0),
    ("layer", 2, True): (12, 4096, 4096),
    ("layer", 3, False): (4, 4096, 0),
    ("layer", 3, True): (8, 65536, 256),
    ("layer", 4, False): (3, 4096, 0),
    ("layer", 4, True): (6, 4096, 4096),
    ("model", 2, False): (4, 256, 0),
    ("model", 2, True): (6, 64, 64),
    ("model", 3, False): (3, 512, 0),
    ("model", 3, True): (4, 256, 16),
    ("model", 4, False): (2, 256, 0),
    ("model", 4, True): (4, 256, 256),
    ("block", 2, False): (3, 64, 0),
    ("block", 2, True): (4, 16, 16),
    ("block", 3, False): (2, 64, 0),
    ("block", 3, True): (4, 64, 64),
    ("block", 4, False): (2, 256, 0),
    ("block", 4, True): (2, 16, 16),
}
# (scope, bits) -> (d, K) with per-line scales, no residual (consulted first for norm "line")
LINE_NORM_TABLE: dict[tuple[str, int], tuple[int, int]] = {
    ("model", 2): (4, 256),
    ("model", 3): (3, 256),
}
# scope -> VPTQ's norm when the config says norm=scope: the reference's per-column mean/std for
# per-layer codebooks (32 bits per input column: 0.008 bpw on 4096 rows), one scale and mean per
# layer for shared codebooks (per-column norms would cost ~0.4 bpw on stories260K, whose layers
# have 32-172 rows; a shared codebook also needs every layer on one scale, which this gives).
VPTQ_NORM: dict[str, str] = {"layer": "line", "block": "tensor", "model": "tensor"}
# scope -> (d_o, K_o) of the outlier codebook
VPTQ_OUTLIERS: dict[str, tuple[int, int]] = {"layer": (4, 8192), "block": (2, 256), "model": (2, 256)}


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


def vptq_spec(bits: int, scope: str, residual: bool, norm: str = "tensor", vector_len: int = 0,
              codebook_size: int = 0, res_codebook_size: int = 0, outlier_percent: float = 0.0,
              outlier_vector_len: int = 0, outlier_codebook_size: int = 0) -> VQSpec:
    """The table's entry for (scope, bits, residual) (LINE_NORM_TABLE first for norm "line"),
    with any non-zero override applied. outlier_codebook_size: 0 = from the table, -1 = fp16
    outlier lines."""
    key = (scope, bits, residual)
    if norm == "line" and not residual and (scope, bits) in LINE_NORM_TABLE:
        d, K, Kr = *LINE_NORM_TABLE[(scope, bits)], 0
    elif key in VPTQ_TABLE:
        d, K, Kr = VPTQ_TABLE[key]
    elif vector_len and codebook_size and (res_codebook_size or not residual):
        d, K, Kr = vector_len, codebook_size, res_codebook_size
    else:
        raise ConfigError(f"vptq: no table entry for scope={scope} bits={bits} residual={residual}; "
                          f"known bits: {sorted({b for s, b, _ in VPTQ_TABLE if s == scope})} "
                          "(or set vector_len, codebook_size and res_codebook_size)")
    d, K = vector_len or d, codebook_size or K
    Kr = (res_codebook_size or Kr) if residual else 0
    if residual and Kr < 2:
        raise ConfigError("vptq: residual=true needs res_codebook_size >= 2")
    do, Ko = VPTQ_OUTLIERS[scope]
    do = outlier_vector_len or do
    Ko = 0 if outlier_codebook_size == -1 else (outlier_codebook_size or Ko)
    if outlier_percent < 0 or outlier_percent >= 100:
        raise ConfigError(f"vptq: outlier_percent must be in [0, 100), got {outlier_percent}")
    return VQSpec(d, K, Kr, outlier_percent, do if outlier_percent else 0, Ko if outlier_percent else 0)
