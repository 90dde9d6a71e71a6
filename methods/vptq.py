"""VPTQ (Liu et al., EMNLP 2024, arXiv 2409.17066; reference microsoft/VPTQ `algorithm` branch,
vptq/vptq.py + vptq/quantizer.py).

Per linear W (out m, in n), vectors along the output dimension (`enable_transpose`): each
vector is d consecutive output rows of one input column, so a column is cut into ceil(m/d)
vectors (zero-padded; see VQLinear) and all vectors of a column see the same H_jj.

  1. normalise (optional): per input column (norm "line", the reference's `enable_norm`,
     norm_dim 0: mean/std over the column) or per tensor ("tensor", one scale: cheap, for
     shared codebooks on small models); scales and biases are fp16 and stored. Default
     ("scope"): line for per-layer codebooks, tensor for shared ones (bits_table.VPTQ_NORM).
  2. importance of column j: H'_jj with H' = S H S (S = the norm scales): the proxy loss of the
     normalised weight. Column order: decreasing importance (`perm`, act-order); the order is
     absorbed (codes are stored in column order), so it costs no bits.
  3. outliers (optional): the top outlier_percent% columns by importance get their own codebook
     (or stay fp16); which columns they are is stored (ceil(log2 n) bits each).
  4. codebook: k-means of the regular columns' vectors, each weighted by its column's H'_jj
     (`hessian_kmeans`, paper §3.2.1), kmeans++ or random init, seeded. Shared codebooks
     (codebook_scope block/model) are fitted before the block loop (vq/codebook.py).
  5. assignment (`second_order`, Algorithm 1): GPTQ's column loop in importance order with
     damping `percdamp` and lazy updates every `blocksize` columns; every vector of a column
     goes to its Euclidean-nearest centroid (H⁻¹_jj is constant within a column, so no
     weighting is needed: "channel-independent"), and the column's error, divided by the
     Cholesky factor U_jj of H⁻¹, is fed to the later columns. Off: each vector simply goes to
     its nearest centroid (plain k-means VQ, the ablation baseline).
  6. residual (optional): k-means of pass 1's error (what each column lacked when quantized)
     gives a residual codebook; pass 2 re-runs the loop from the original weight, choosing for
     every vector its nearest main centroid and then the nearest residual centroid to what is
     left (greedy, as the reference).
  7. layer-wise fine-tuning (optional, `finetune`): centroids, norms and RMSNorm against the
     full-precision block outputs (vq/finetune.py).

Deviations from the reference, each on purpose:
  * with normalisation the loop and the k-means weights use H' = S H S, the Hessian of the
    normalised weight; the reference feeds the unscaled H, which mis-weights the error
    feedback unless all column scales are equal;
  * outliers are the most important columns whether or not `perm` is on (the reference takes
    the first columns of whatever order it has); outlier columns get no residual codebook;
  * padded vector entries have zero weight in k-means and in the nearest-centroid search
    (the reference fits the zero padding as if it were weight);
  * the Hessian is the uncentred XᵀX/n of hessian.py (VPTQ's released Hessians are centred
    covariances; for a bias-free linear the uncentred one is the output error's Hessian);
  * k-means is our own (deterministic, seeded); the reference uses cuML (non-deterministic);
  * shared codebooks (scope block/model) and their residual codebooks are fitted on the
    weights and the full-precision Hessian diagonals before the loop; the residual one on
    k-means' own error, since pass-1 errors of all members do not exist yet (vq/codebook.py).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ttvq_bench.errors import ConfigError, QuantizationError
from ttvq_methods.base import Method
from ttvq_methods.gptq import _hinv_upper
from ttvq_methods.hessian import layer_proxy_loss
from ttvq_methods.registry import register_method
from ttvq_methods.vq.bits_table import VPTQ_NORM, VQSpec, vptq_spec
from ttvq_methods.vq.codebook import (SCOPES, fit_codebook, fp_input_diag, pooled, scope_key, tie_shared,
                                      to_vectors, vector_weights)
from ttvq_methods.vq.finetune import finetune_vq_block
from ttvq_methods.vq.kmeans import nearest
from ttvq_methods.vq.layer import NORMS, VQLinear

log = logging.getLogger(__name__)


@dataclass
class VPTQConfig:
    name: str = "vptq"
    codebook_scope: str = "layer"  # layer (paper) | block | model; see vq/codebook.py
    # Shape: 0 means "from the bits table" (vq/bits_table.py).
    vector_len: int = 0
    codebook_size: int = 0
    residual: bool = False  # residual codebook + second pass
    res_codebook_size: int = 0
    outlier_percent: float = 0.0  # % of input columns with their own codebook (reference: npercent)
    outlier_vector_len: int = 0
    outlier_codebook_size: int = 0  # -1: outlier columns kept in fp16
    # none | tensor | line (per input column, the reference's enable_norm) | scope: the scope's
    # default from the bits table (line for "layer", tensor for the shared scopes)
    norm: str = "scope"
    norm_bias: bool = True  # store a per-column (per-tensor) mean as well as the scale
    perm: bool = True  # quantize columns by decreasing importance (reference: enable_perm)
    hessian_kmeans: bool = True  # k-means weights = H'_jj (reference: kmeans_mode=hessian)
    second_order: bool = True  # GPTQ-style column loop with error feedback; false: plain VQ
    percdamp: float = 0.01
    blocksize: int = 128  # lazy-update block width: speed only
    kmeans_iters: int = 100
    kmeans_tol: float = 1e-5
    kmeans_init: str = "kmeans++"  # kmeans++ | random (the reference's cuML init)
    kmeans_seed: int = 0
    finetune: bool = False  # block-wise tuning of centroids, norms (and RMSNorm)
    ft_iters: int = 100
    ft_lr: float = 1e-4
    ft_rmsnorm: bool = True
    true_sequential: bool = True  # consumed by the block loop


@dataclass
class LayerPrep:
    """A linear's weight in the normalised domain and what the quantizer derives from it."""

    Wn: torch.Tensor  # (m, n) normalised weight (dead columns zeroed)
    scale: torch.Tensor | None  # (n,) or (1,) fp16-exact, None without norm
    bias: torch.Tensor | None
    importance: torch.Tensor  # (n,) H'_jj
    outliers: torch.Tensor  # (n_out,) sorted column indices
    regular: torch.Tensor  # the other columns, sorted


@dataclass
class VPTQResult:
    layer: VQLinear
    Wq: torch.Tensor  # (m, n) fp32, == layer.dequantize() exactly
    Qn: torch.Tensor  # (m, n) the normalised-domain result of the loop
    stats: dict = field(default_factory=dict)


def normalize(W: torch.Tensor, norm: str, with_bias: bool):
    """(Wn, scale, bias) with W ≈ Wn · scale + bias per input column ("line") or per tensor.
    Scale/bias are rounded to fp16 first, so Wn is exact for the stored values."""
    if norm not in NORMS:
        raise ConfigError(f"vptq: norm must be one of {NORMS}, got {norm!r}")
    if norm == "none":
        return W, None, None
    x = W if norm == "line" else W.reshape(-1, 1)
    mean = x.mean(0) if with_bias else torch.zeros(x.shape[1], device=W.device)
    std = ((x - mean) ** 2).mean(0).sqrt()
    tiny = torch.finfo(torch.float16).tiny
    scale = torch.where(std > 0, std, torch.ones_like(std)).clamp(tiny, 65504).half().float()
    bias = mean.half().float() if with_bias else None
    Wn = (W - bias) / scale if with_bias else W / scale
    return Wn, scale, bias


def n_outlier_columns(percent: float, n: int) -> int:
    return min(n - 1, math.ceil(percent / 100 * n)) if percent > 0 else 0


def resolve_norm(cfg: VPTQConfig) -> VPTQConfig:
    """norm "scope" -> the scope's default norm (bits_table.VPTQ_NORM)."""
    return dataclasses.replace(cfg, norm=VPTQ_NORM[cfg.codebook_scope]) if cfg.norm == "scope" else cfg


def prep_layer(W: torch.Tensor, hdiag: torch.Tensor, cfg: VPTQConfig, spec: VQSpec) -> LayerPrep:
    cfg = resolve_norm(cfg)
    W = W.detach().float().clone()
    hdiag = hdiag.to(W.device)
    dead = hdiag == 0  # columns no input ever touched cannot matter: zero them (as GPTQ)
    W[:, dead] = 0
    Wn, scale, bias = normalize(W, cfg.norm, cfg.norm_bias)
    s2 = 1.0 if scale is None else scale.double() ** 2
    imp = (hdiag.double().clone().masked_fill(dead, 1.0) * s2).float()
    rank = torch.argsort(imp, descending=True, stable=True)
    n_out = n_outlier_columns(spec.outlier_percent, W.shape[1])
    outliers = rank[:n_out].sort().values
    is_out = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    is_out[outliers] = True
    return LayerPrep(Wn, scale, bias, imp, outliers, (~is_out).nonzero().squeeze(1))


class _LineVQ:
    """Nearest-centroid coding of whole columns (lines) of length m, padding masked."""

    def __init__(self, C: torch.Tensor, R: torch.Tensor | None, m: int):
        self.C = C.float()
        self.R = None if R is None else R.float()
        self.d = C.shape[1]
        self.m, self.nv = m, math.ceil(m / self.d)
        self.pad = self.nv * self.d - m

    def __call__(self, lines: torch.Tensor):
        """lines (L, m) -> (q (L, m), codes (L, nv), res_codes (L, nv) or None)."""
        L = lines.shape[0]
        x, mask = to_vectors(lines, self.d)
        idx = nearest(x, self.C, mask)
        q = self.C[idx]
        ridx = None
        if self.R is not None:
            ridx = nearest(x - q, self.R, mask)
            q = q + self.R[ridx]
        q = q.reshape(L, self.nv * self.d)[:, : self.m]
        return q, idx.view(L, self.nv), None if ridx is None else ridx.view(L, self.nv)


def _second_order(Wn, H, order, code_column, percdamp, blocksize, name):
    """GPTQ's lazy-batch loop over single columns (`step=1`, as VPTQ forces with transpose).
    Returns (Q, E): the quantized normalised weight and, per column, w - q at the moment it
    was quantized (the reference's `qerror`), both in original column order."""
    W = Wn[:, order].clone()
    Hp = H[order][:, order]
    U = _hinv_upper(Hp, percdamp, name).float()
    n = W.shape[1]
    Q, E = torch.empty_like(W), torch.empty_like(W)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = code_column(int(order[i1 + i]), w)
            Q[:, i1 + i], E[:, i1 + i] = q, w - q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= torch.outer(err, U1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inv = torch.argsort(order)
    return Q[:, inv], E[:, inv]


def _fit(lines, imp, d, K, cfg, seed_offset):
    x, mask = to_vectors(lines, d)
    w = vector_weights(imp if cfg.hessian_kmeans else torch.ones_like(imp), lines.shape[1], d, mask)
    C, _ = fit_codebook(x, w, K, iters=cfg.kmeans_iters, tol=cfg.kmeans_tol, init=cfg.kmeans_init,
                        seed=cfg.kmeans_seed + seed_offset)
    return C


@torch.no_grad()
def vptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: VQSpec, cfg: VPTQConfig, *, name: str = "",
                  books: dict[str, torch.Tensor] | None = None, scope: str | None = None,
                  bias: torch.Tensor | None = None) -> VPTQResult:
    """Quantize one linear's weight W (m, n) with input Hessian H (n, n); `books` holds shared
    fp16 codebooks (codebook, res_codebook, outlier_codebook) fitted for `scope`."""
    m, n = W.shape
    cfg = resolve_norm(cfg)
    if H is None or tuple(H.shape) != (n, n):
        raise QuantizationError(f"vptq {name}: needs an input Hessian of shape {(n, n)}, got {None if H is None else tuple(H.shape)}")
    dev = W.device
    H = H.detach().to(dev, torch.float64).clone()
    if not torch.isfinite(W).all() or not torch.isfinite(H).all():
        raise QuantizationError(f"vptq {name}: weight or Hessian contains NaN/Inf")
    hdiag = H.diagonal().clone()
    dead = hdiag == 0
    H[dead, dead] = 1
    p = prep_layer(W, hdiag, cfg, spec)
    s = torch.ones(n, dtype=torch.float64, device=dev) if p.scale is None else p.scale.double().expand(n)
    Hn = H * s[:, None] * s[None, :]
    order = torch.argsort(p.importance, descending=True, stable=True) if cfg.perm else torch.arange(n, device=dev)
    books = books or {}
    d, K, Kr = spec.vector_len, spec.codebook_size, spec.res_codebook_size
    n_out, reg = p.outliers.numel(), p.regular
    stats: dict = {}

    C = books.get("codebook")
    if C is None:
        C = _fit(p.Wn[:, reg].T, p.importance[reg], d, K, cfg, 0)
    Co = None
    if n_out and spec.outlier_codebook_size:
        Co = books.get("outlier_codebook")
        if Co is None:
            Co = _fit(p.Wn[:, p.outliers].T, p.importance[p.outliers], spec.outlier_vector_len,
                      spec.outlier_codebook_size, cfg, 2)
    is_out = (torch.zeros(n, dtype=torch.bool, device=dev).index_fill_(0, p.outliers, True)).tolist()

    def run(R):
        main, outq = _LineVQ(C, R, m), (_LineVQ(Co, None, m) if Co is not None else None)
        codes = torch.zeros(n, main.nv, dtype=torch.long, device=dev)
        rcodes = torch.zeros(n, main.nv, dtype=torch.long, device=dev) if R is not None else None
        ocodes = torch.zeros(n, outq.nv, dtype=torch.long, device=dev) if outq is not None else None

        def code_column(j, w):
            if is_out[j]:
                if outq is None:  # fp16 outlier column
                    return w.half().float()
                q, c, _ = outq(w[None])
                ocodes[j] = c[0]
                return q[0]
            q, c, r = main(w[None])
            codes[j] = c[0]
            if r is not None:
                rcodes[j] = r[0]
            return q[0]

        if cfg.second_order:
            Q, E = _second_order(p.Wn, Hn, order, code_column, cfg.percdamp, cfg.blocksize, name)
        else:  # plain VQ: every column on its own, no error feedback
            Q = torch.stack([code_column(j, p.Wn[:, j]) for j in range(n)], 1)
            E = p.Wn - Q
        return Q, E, codes, rcodes, ocodes

    R = None
    if Kr:
        R = books.get("res_codebook")
        if R is None:  # paper: k-means on pass 1's error, then pass 2 re-chooses every index
            Q1, E1, *_ = run(None)
            stats["proxy_pass1"] = layer_proxy_loss(p.Wn, Q1, Hn)
            R = _fit(E1[:, reg].T, p.importance[reg], d, Kr, cfg, 1)
    Qn, _, codes, rcodes, ocodes = run(R)

    layer = VQLinear(n, m, d, K, "out", Kr, n_out, spec.outlier_vector_len if Co is not None else 0,
                     spec.outlier_codebook_size if Co is not None else 0, cfg.norm, cfg.norm_bias,
                     has_bias=bias is not None).to(dev)
    for bname, t in (("codebook", C), ("res_codebook", R), ("outlier_codebook", Co)):
        if t is None:
            continue
        if scope is not None and books.get(bname) is t:
            layer.share(bname, t, scope)
        else:
            layer._buffers[bname].copy_(t)
    layer.set_codes(codes[reg], rcodes[reg] if rcodes is not None else None, p.outliers,
                    ocodes[p.outliers] if ocodes is not None else None,
                    Qn[:, p.outliers].T if (n_out and Co is None) else None)
    if p.scale is not None:
        layer.set_norm(p.scale, p.bias)
    if bias is not None:
        layer.bias.copy_(bias.detach().half())
    Wq = layer.dequantize()
    if not torch.isfinite(Wq).all():
        raise QuantizationError(f"vptq {name}: result contains NaN/Inf")
    stats["proxy"] = layer_proxy_loss(p.Wn, Qn, Hn)
    return VPTQResult(layer=layer, Wq=Wq, Qn=Qn, stats=stats)


@register_method("vptq", VPTQConfig)
class VPTQ(Method):
    needs_hessian = True

    def __init__(self, cfg: VPTQConfig, bits: int):
        if cfg.codebook_scope not in SCOPES:
            raise ConfigError(f"vptq: codebook_scope must be one of {SCOPES}, got {cfg.codebook_scope!r}")
        cfg = resolve_norm(cfg)
        super().__init__(cfg, bits)
        if cfg.norm not in NORMS:
            raise ConfigError(f"vptq: norm must be one of {NORMS}, got {cfg.norm!r}")
        if cfg.kmeans_init not in ("kmeans++", "random"):
            raise ConfigError(f"vptq: kmeans_init must be kmeans++ or random, got {cfg.kmeans_init!r}")
        self.spec = vptq_spec(bits, cfg.codebook_scope, cfg.residual, cfg.vector_len, cfg.codebook_size,
                              cfg.res_codebook_size, cfg.outlier_percent, cfg.outlier_vector_len,
                              cfg.outlier_codebook_size)
        self.wants_block_targets = bool(cfg.finetune)
        self.books: dict[str, dict[str, torch.Tensor]] = {}
        self.layer_stats: dict[str, dict] = {}

    # -- shared codebooks, fitted once before the block loop ---------------------------------
    @torch.no_grad()
    def prepare_model(self, model: nn.Module, inputs) -> None:
        cfg, spec = self.cfg, self.spec
        if cfg.codebook_scope == "layer":
            return
        from ttvq_methods.blockwise import decoder_layers, linears

        diag = fp_input_diag(model, inputs)
        groups: dict[str, list[tuple[str, nn.Linear]]] = {}
        for b, block in enumerate(decoder_layers(model)):
            for n, lin in linears(block).items():
                full = f"model.layers.{b}.{n}"
                groups.setdefault(scope_key(cfg.codebook_scope, full), []).append((full, lin))
        kw = dict(iters=cfg.kmeans_iters, tol=cfg.kmeans_tol, init=cfg.kmeans_init)
        for key, members in groups.items():
            reg_sets, out_sets = [], []
            for full, lin in members:
                p = prep_layer(lin.weight.data, diag[full], cfg, spec)
                imp = p.importance if cfg.hessian_kmeans else torch.ones_like(p.importance)
                m = lin.out_features
                x, mask = to_vectors(p.Wn[:, p.regular].T, spec.vector_len)
                reg_sets.append((x, vector_weights(imp[p.regular], m, spec.vector_len, mask)))
                if p.outliers.numel() and spec.outlier_codebook_size:
                    xo, mo = to_vectors(p.Wn[:, p.outliers].T, spec.outlier_vector_len)
                    out_sets.append((xo, vector_weights(imp[p.outliers], m, spec.outlier_vector_len, mo)))
            x, w = pooled(reg_sets)
            C, r = fit_codebook(x, w, spec.codebook_size, seed=cfg.kmeans_seed, **kw)
            books = {"codebook": C}
            if spec.res_codebook_size:
                resid = x - C.float()[nearest(x, C.float(), w if w.dim() == 2 else None)]
                books["res_codebook"], _ = fit_codebook(resid, w, spec.res_codebook_size, seed=cfg.kmeans_seed + 1, **kw)
            if out_sets:
                xo, wo = pooled(out_sets)
                books["outlier_codebook"], _ = fit_codebook(xo, wo, spec.outlier_codebook_size,
                                                            seed=cfg.kmeans_seed + 2, **kw)
            self.books[key] = books
            log.info("vptq: shared codebooks for %s fitted on %d vectors (inertia %.4g)", key, x.shape[0], r.inertia)

    def quantize_layer(self, name: str, layer: nn.Linear, H: torch.Tensor | None) -> nn.Module:
        key = scope_key(self.cfg.codebook_scope, name)
        books = self.books.get(key) if key is not None else None
        if key is not None and books is None:
            raise QuantizationError(f"vptq {name}: no shared codebook for scope {key!r} (prepare_model not run?)")
        r = vptq_quantize(layer.weight.data, H, self.spec, self.cfg, name=name, books=books, scope=key,
                          bias=layer.bias)
        self.layer_stats[name] = r.stats
        log.debug("vptq %s: proxy loss %s, bpw of the layer alone %.3f", name, r.stats, r.layer.bpw())
        return r.layer.to(layer.weight.device)

    def finetune_block(self, block: nn.Module, inputs, targets: torch.Tensor, layer_kwargs: dict) -> None:
        frozen = ("model",) if self.cfg.codebook_scope == "model" else ()
        finetune_vq_block(block, inputs, targets, iters=self.cfg.ft_iters, lr=self.cfg.ft_lr,
                          tune_rmsnorm=self.cfg.ft_rmsnorm, frozen_scopes=frozen)

    def finalize(self, model: nn.Module, calib_ids: torch.Tensor) -> None:
        # Blocks loaded from a resume directory hold their own copy of a model-wide codebook.
        if self.cfg.codebook_scope != "layer":
            tie_shared(model)
