"""VPTQ (Liu et al., EMNLP 2024, arXiv 2409.17066; reference microsoft/VPTQ, `algorithm`
branch). What it does, every choice where the paper or the reference is open, and the
measurements: docs/methods/vptq.md.

Per linear W (out m, in n), vectors along the output dimension: each vector is d consecutive
output rows of one input column, so all vectors of a column see the same H_jj. Steps:
normalise (per column or per tensor), importance H'_jj of the normalised weight, optional
outlier columns with their own codebook, a Hessian-weighted k-means codebook (fitted before
the block loop when shared by a block or the model), then GPTQ's column loop in importance
order where every vector of a column goes to its nearest centroid (`second_order`; off: plain
nearest-centroid VQ), optionally a residual codebook fitted on pass 1's errors and a second
pass, and optional block-wise fine-tuning of codebooks and norms.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ttvq_bench.choices import Choice
from ttvq_bench.errors import ConfigError, QuantizationError
from ttvq_methods.base import BlockContext, VQMethod, check_ranges
from ttvq_methods.distill import TrainConfig, distill_block
from ttvq_methods.model_walk import decoder_layers, layer_name, linears, modules_of, norm_params
from ttvq_methods.registry import METHODS
from ttvq_methods.second_order import fp_hessians, hinv_upper, layer_proxy_loss, obs_quantize, prepare_hessian
from ttvq_methods.vq.budget import NORM_BY_SCOPE, Resolved, VQSpec, model_shapes, n_outlier_columns, resolve
from ttvq_methods.vq.codebook import CodebookScope, fit_codebook, pooled, scope_key, tie_shared, vector_weights
from ttvq_methods.vq.kmeans import KMeansInit, nearest
from ttvq_methods.vq.layer import VQLinear, stored_mode, to_vectors, train_mode

log = logging.getLogger(__name__)


class HessianSource(Choice):
    sequential = "sequential"  # on the quantized prefix, true-sequential (GPTQ's way; the default)
    fp = "fp"  # once from the full-precision model (the reference VPTQ, QuIP#, QTIP)


class VPTQNorm(Choice):
    scope = "scope"  # the scope's default (vq/budget.NORM_BY_SCOPE): line for "layer", tensor otherwise
    none = "none"
    tensor = "tensor"  # one fp16 scale (and mean) per layer
    line = "line"  # per input column: the reference's enable_norm (mean/std over the column)


@dataclass
class VPTQConfig:
    name: str = "vptq"
    # auto: from the bits budget and the model's layer sizes (vq/budget.py); layer is the paper's
    codebook_scope: CodebookScope = CodebookScope.auto
    # Shape: 0 means "resolved from the bits budget" (vq/budget.py).
    vector_len: int = 0
    codebook_size: int = 0
    residual: bool = False  # residual codebook + second pass
    res_codebook_size: int = 0
    outlier_percent: float = 0.0  # % of input columns with their own codebook (reference: npercent)
    outlier_vector_len: int = 0
    outlier_codebook_size: int = 0  # -1: outlier columns kept in fp16
    max_codebook_size: int = 4096  # the largest K (and Kr) the budget rule considers
    norm: VPTQNorm = VPTQNorm.scope
    norm_bias: bool = True  # store a per-column (per-tensor) mean as well as the scale
    perm: bool = True  # quantize columns by decreasing importance (reference: enable_perm)
    hessian_kmeans: bool = True  # k-means weights = H'_jj (reference: kmeans_mode=hessian)
    second_order: bool = True  # GPTQ-style column loop with error feedback; false: plain VQ
    percdamp: float = 0.01
    blocksize: int = 128  # lazy-update block width: speed only
    hessians: HessianSource = HessianSource.sequential
    kmeans_iters: int = 100
    kmeans_tol: float = 1e-5
    kmeans_init: KMeansInit = KMeansInit.kmeanspp  # kmeanspp | random (the reference's cuML init)
    kmeans_seed: int = 0
    finetune: bool = False  # block-wise tuning of block-local codebooks, norms (and RMSNorm)
    ft_epochs: int = 6  # over the calibration windows (128 windows, batch 8: ~100 steps, the paper's)
    ft_lr: float = 1e-4
    ft_rmsnorm: bool = True
    true_sequential: bool = True  # Hessians of later sublayers after earlier ones are quantized


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


def resolve_norm(cfg: VPTQConfig) -> VPTQConfig:
    """norm "scope" -> the scope's default norm (vq/budget.NORM_BY_SCOPE)."""
    if cfg.norm != "scope":
        return cfg
    if cfg.codebook_scope == "auto":
        raise QuantizationError("vptq: norm 'scope' with codebook_scope 'auto' is resolved from the budget first")
    return dataclasses.replace(cfg, norm=VPTQNorm(NORM_BY_SCOPE[cfg.codebook_scope]))


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


def _setup(W: torch.Tensor, H: torch.Tensor | None, cfg: VPTQConfig, spec: VQSpec, name: str):
    """(LayerPrep, H' = S H S the Hessian of the normalised weight, column order or None)."""
    W, H = prepare_hessian(W, H, f"vptq {name}")
    p = prep_layer(W, H.diagonal(), cfg, spec)
    n = W.shape[1]
    s = torch.ones(n, dtype=torch.float64, device=W.device) if p.scale is None else p.scale.double().expand(n)
    Hn = H * s[:, None] * s[None, :]
    order = torch.argsort(p.importance, descending=True, stable=True) if cfg.perm else None
    return p, Hn, order


class _LineVQ:
    """Nearest-centroid coding of whole columns (lines) of length m, padding masked."""

    def __init__(self, C: torch.Tensor, R: torch.Tensor | None, m: int):
        self.C = C.float()
        self.R = None if R is None else R.float()
        self.d = C.shape[1]
        self.m, self.nv = m, math.ceil(m / self.d)

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
    fp16 codebooks by layer buffer name (codebook0, codebook1, outlier_codebook) for `scope`."""
    m, n = W.shape
    cfg = resolve_norm(cfg)
    p, Hn, order = _setup(W, H, cfg, spec, name)
    dev = p.Wn.device
    books = books or {}
    d, K, Kr = spec.vector_len, spec.codebook_size, spec.res_codebook_size
    n_out, reg = p.outliers.numel(), p.regular
    stats: dict = {}

    C = books.get("codebook0")
    if C is None:
        C = _fit(p.Wn[:, reg].T, p.importance[reg], d, K, cfg, 0)
    Co = None
    if n_out and spec.outlier_codebook_size:
        Co = books.get("outlier_codebook")
        if Co is None:
            Co = _fit(p.Wn[:, p.outliers].T, p.importance[p.outliers], spec.outlier_vector_len,
                      spec.outlier_codebook_size, cfg, 2)
    is_out = (torch.zeros(n, dtype=torch.bool, device=dev).index_fill_(0, p.outliers, True)).tolist()
    col = (lambda c: c) if order is None else order.tolist().__getitem__

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
            Q, E = obs_quantize(p.Wn, Hn, lambda c, w, _ahead: code_column(col(c), w), percdamp=cfg.percdamp,
                                blocksize=cfg.blocksize, who=f"vptq {name}", order=order)
        else:  # plain VQ: every column on its own, no error feedback
            Q = torch.stack([code_column(j, p.Wn[:, j]) for j in range(n)], 1)
            E = p.Wn - Q
        return Q, E, codes, rcodes, ocodes

    R = None
    if Kr:
        R = books.get("codebook1")
        if R is None:  # paper: k-means on pass 1's error, then pass 2 re-chooses every index
            Q1, E1, *_ = run(None)
            stats["proxy_pass1"] = layer_proxy_loss(p.Wn, Q1, Hn)
            R = _fit(E1[:, reg].T, p.importance[reg], d, Kr, cfg, 1)
    Qn, _, codes, rcodes, ocodes = run(R)

    layer = VQLinear(n, m, d, spec.codebook_sizes, "out", n_out, spec.outlier_vector_len if Co is not None else 0,
                     spec.outlier_codebook_size if Co is not None else 0, cfg.norm, cfg.norm_bias,
                     has_bias=bias is not None).to(dev)
    for bname, t in (("codebook0", C), ("codebook1", R), ("outlier_codebook", Co)):
        if t is None:
            continue
        if scope is not None and books.get(bname) is t:
            layer.share(bname, t, scope)
        else:
            layer._buffers[bname].copy_(t)
    layer.set_codes([codes[reg]] + ([rcodes[reg]] if rcodes is not None else []), p.outliers,
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


@METHODS.register("vptq")
class VPTQ(VQMethod):
    Config = VPTQConfig
    needs_hessian = True
    parallel_layers = True
    layer_state_attrs = ("layer_stats",)

    def __init__(self, cfg: VPTQConfig, bits: int):
        super().__init__(cfg, bits)
        check_ranges(cfg, self.name, ft_epochs=">= 0", kmeans_iters=">= 1", blocksize=">= 1", percdamp=">= 0",
                     outlier_percent="in [0, 100)", max_codebook_size=">= 4")
        if cfg.residual and cfg.res_codebook_size == 1:
            raise ConfigError(f"{self.name}: residual=true needs res_codebook_size >= 2 (or 0: from the budget)")
        self.spec: VQSpec | None = None  # resolved from the budget and the model in prepare()
        self.resolved: Resolved | None = None
        self.needs_hessian = cfg.hessians == "sequential"
        self.fp_H: dict[str, torch.Tensor] = {}  # hessians=fp: every layer's, from the FP model
        self.books: dict[str, dict[str, torch.Tensor]] = {}
        self.layer_stats: dict[str, dict] = {}
        self.ft: dict[int, dict] = {}

    @property
    def true_sequential(self) -> bool:
        return self.cfg.true_sequential

    @property
    def needs_block_targets(self) -> bool:
        return self.cfg.finetune

    def shape(self) -> dict:
        if self.resolved is None:
            return {}
        return self.resolved.report(self.bits)

    def resolve_shape(self, model: nn.Module) -> None:
        """The shape `bits` buys on this model (vq/budget.py), logged and recorded."""
        c = self.cfg
        r = resolve(self.bits, model_shapes(model), scope=c.codebook_scope, norm=c.norm, norm_bias=c.norm_bias,
                    residual=c.residual, vector_len=c.vector_len, codebook_size=c.codebook_size,
                    res_codebook_size=c.res_codebook_size, outlier_percent=c.outlier_percent,
                    outlier_vector_len=c.outlier_vector_len, outlier_codebook_size=c.outlier_codebook_size,
                    max_codebook_size=c.max_codebook_size)
        self.resolved, self.spec = r, r.spec
        self.cfg = dataclasses.replace(c, codebook_scope=CodebookScope(r.scope), norm=VPTQNorm(r.norm))
        log.info("%s: bits=%d -> codebook_scope=%s d=%d K=%s norm=%s: %.4f bpw%s", self.name, self.bits, r.scope,
                 r.spec.vector_len, "+".join(map(str, r.spec.codebook_sizes)), r.norm, r.bpw,
                 " (over budget)" if r.over_budget else "")

    # -- shared codebooks, fitted once before the block loop --------------------------------------
    @torch.no_grad()
    def prepare(self, model: nn.Module, inputs, teacher) -> None:
        self.resolve_shape(model)
        cfg, spec = self.cfg, self.spec
        if cfg.hessians == "fp":
            self.fp_H = fp_hessians(model, inputs)
        if cfg.codebook_scope == "layer":
            return
        diag = fp_hessians(model, inputs, diag_only=True)
        groups: dict[str, list[tuple[str, nn.Linear]]] = {}
        for b, block in enumerate(decoder_layers(model)):
            for n, lin in linears(block).items():
                full = layer_name(b, n)
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
            books = {"codebook0": C}
            if spec.res_codebook_size:
                resid = x - C.float()[nearest(x, C.float(), w if w.dim() == 2 else None)]
                books["codebook1"], _ = fit_codebook(resid, w, spec.res_codebook_size, seed=cfg.kmeans_seed + 1, **kw)
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
            raise QuantizationError(f"vptq {name}: no shared codebook for scope {key!r} (prepare not run?)")
        if self.cfg.hessians == "fp":
            H = self.fp_H[name]
        r = vptq_quantize(layer.weight.data, H, self.spec, self.cfg, name=name, books=books, scope=key,
                          bias=layer.bias)
        self.layer_stats[name] = r.stats
        log.debug("vptq %s: proxy loss %s, bpw of the layer alone %.3f", name, r.stats, r.layer.bpw())
        return r.layer.to(layer.weight.device)

    def adopt_layer(self, name: str, q: nn.Module, state: dict) -> None:
        """A layer quantized on another process arrives with copies of the shared codebooks:
        it holds this process's own again (one tensor per scope, as stored and counted)."""
        super().adopt_layer(name, q, state)
        for bname, key in q.shared.items():
            q.share(bname, self.books[key][bname], key)

    @torch.no_grad()
    def rounded_weight(self, name: str, W: torch.Tensor, H: torch.Tensor | None, q: VQLinear) -> torch.Tensor:
        """The weight the column loop actually rounded: it quantizes each column of W after the
        error feedback of the columns before it, so its codes are the nearest codewords of that
        updated weight W'. With Q the normalised result, U the upper Cholesky factor of H⁻¹ in
        the loop's column order and D = diag(U), the loop's recursion
        W'_i = W_i - Σ_{k<i} (W'_k - Q_k) U_ki / U_kk solves in closed form to
        W' = Q + (W - Q) U⁻¹ D. Returned in the original domain (out, in)."""
        if not self.cfg.second_order:
            return W.detach().float()
        H = self.fp_H.get(name, H) if self.cfg.hessians == "fp" else H
        p, Hn, order = _setup(W, H, self.cfg, self.spec, name)
        order = torch.arange(W.shape[1], device=Hn.device) if order is None else order
        U = hinv_upper(Hn[order][:, order], self.cfg.percdamp, f"vptq {name}").double()
        Qn = q.dequantize().double()
        if p.bias is not None:
            Qn = Qn - p.bias.double()
        if p.scale is not None:
            Qn = Qn / p.scale.double()
        delta = (p.Wn.double() - Qn)[:, order]
        delta = torch.linalg.solve_triangular(U, delta, upper=True, left=False) * U.diagonal()
        Wc = Qn.clone()
        Wc[:, order] += delta
        if p.scale is not None:
            Wc = Wc * p.scale.double()
        if p.bias is not None:
            Wc = Wc + p.bias.double()
        return Wc.float()

    def finetune_block(self, ctx: BlockContext) -> None:
        """Codebooks local to the block (a model-wide one is frozen: it serves finished blocks
        too), norm scales and biases, fp16 outlier columns and the RMSNorm weights, against the
        FP block's outputs, codes fixed (paper §4)."""
        if not self.cfg.finetune:
            return
        cfg = self.cfg
        layers = train_mode(modules_of(ctx.block, VQLinear))
        params = []
        for q in layers.values():
            roles = q.params_by_role(frozen_scopes=("model",))
            params += roles["codebook"] + roles["scale"] + roles["outliers"]
        if cfg.ft_rmsnorm:
            params += norm_params(ctx.block)
        try:
            res = distill_block(ctx.block, ctx.inputs.hidden, ctx.targets, ctx.inputs.kwargs_by_bs,
                                [{"params": params, "lr": cfg.ft_lr}],
                                TrainConfig(epochs=cfg.ft_epochs, batch_size=ctx.inputs.batch_size, min_lr_ratio=1.0),
                                desc=f"vptq finetune block {ctx.index}")
        finally:
            stored_mode(layers.values())
        self.ft[ctx.index] = {k: res[k] for k in ("train_before", "train_after", "val_before", "val_after",
                                                  "best_epoch", "steps", "seconds", "n_params")}

    def finalize(self, model: nn.Module, calib_ids: torch.Tensor, teacher) -> None:
        self.fp_H = {}
        # Blocks loaded from a resume directory hold their own copy of a model-wide codebook.
        if self.cfg.codebook_scope != "layer":
            tie_shared(model)

    def report(self) -> dict:
        return {"shape": self.shape(), "proxy_loss": {n: s["proxy"] for n, s in self.layer_stats.items()},
                **({"finetune": self.ft} if self.ft else {})}
