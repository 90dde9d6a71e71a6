"""AQLM-style additive quantization (Egiazarian et al., ICML 2024, arXiv 2401.06118; reference
Vahe1994/AQLM) with optional PV-tuning (Malinovskii et al., NeurIPS 2024, arXiv 2405.14852).
What it does, every choice where the paper or the reference is open, and the measurements:
docs/methods/aqlm.md.

Per linear W (out m, in n): each group of g consecutive inputs of an output row is the sum of
M codewords, one from each of M per-layer codebooks of 2^B entries, times the row's scale
(VQLinear, orientation "in", norm "line", no mean). (M, B, g) come from the bits budget on
the model's own layer shapes (vq/budget.py). Steps per linear: scales = row norms, residual
k-means of the normalised rows (vq/kmeans.py), then alternate Adam steps on codebooks and
scales (objective tr(ΔW H ΔWᵀ)/m, H = XᵀX/n) with a beam-search re-encoding of every code under
the full H (vq/beam_search.py) until the relative improvement of an epoch falls below
`relative_mse_tolerance`. Per block: optional fine-tuning of the block's codebooks, scales and
RMSNorm weights against the FP block's outputs (distill.distill_block). At the end, optional
PV-tuning: end-to-end KL distillation from the FP model (distill.distill_model), codebooks,
scales and norms by Adam (P step), codes by beam search from straight-through latents for the
fraction of groups whose latent moved farthest (V step).
"""
from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ttvq_bench.errors import ConfigError, QuantizationError
from ttvq_methods.base import BlockContext, TeacherRequest, VQMethod, check_ranges
from ttvq_methods.distill import TrainConfig, distill_block, distill_model, teacher_targets_args, trainable_fraction
from ttvq_methods.model_walk import modules_of, norm_params, unique_param_count
from ttvq_methods.registry import METHODS
from ttvq_methods.second_order import layer_proxy_loss, prepare_hessian
from ttvq_methods.vq.beam_search import BeamEncoder, beam_search_xtx, reencode_moved
from ttvq_methods.vq.budget import Resolved, VQSpec, model_shapes, resolve
from ttvq_methods.vq.kmeans import KMeansInit, kmeans, nearest
from ttvq_methods.vq.layer import VQLinear, stored_mode, to_vectors, train_mode

log = logging.getLogger(__name__)


@dataclass
class AQLMConfig:
    name: str = "aqlm"
    # -- shape: 0 = resolved from the bits budget on the model's layer shapes (vq/budget.py) ------
    num_codebooks: int = 0  # M
    codebook_bits: int = 0  # B: each codebook has 2^B entries
    group_size: int = 0  # g: consecutive inputs of a row per group
    max_codebooks: int = 8  # the largest M the budget rule considers
    max_codebook_bits: int = 16  # the largest B (the paper's 1x16)
    max_group_size: int = 8  # the longest g (the reference's in_group_size default)
    # -- initialisation: residual k-means of the row-normalised weight -----------------------------
    kmeans_iters: int = 100  # reference init_max_iter
    kmeans_tol: float = 1e-5
    kmeans_init: KMeansInit = KMeansInit.random  # the reference's (random points); kmeanspp measured worse
    hessian_kmeans: bool = False  # weight each entry by H_jj (the reference's k-means is unweighted)
    seed: int = 0
    # -- per-layer calibration: Adam on codebooks + scales, beam search on codes --------------------
    lr: float = 1e-4  # reference --lr
    beta1: float = 0.0  # reference: Adam(betas=(0, 0.95), amsgrad=True)
    beta2: float = 0.95
    steps_per_epoch: int = 100  # Adam steps between beam searches
    max_epochs: int = 1000  # beam-search rounds at most
    relative_mse_tolerance: float = 0.01  # stop when an epoch improves the proxy loss by less than this
    beam_size: int = 1  # reference default
    true_sequential: bool = False  # the reference's default: every linear's Hessian from the block's inputs at once (docs)
    # -- block-wise fine-tuning (continuous parameters, codes fixed) -----------------------------
    finetune: bool = True
    ft_epochs: int = 25
    ft_batch_size: int = 8
    ft_lr: float = 1e-4
    ft_rmsnorm: bool = True  # the block's RMSNorm weights train too (the reference trains every float)
    val_fraction: float = 0.1  # held-out calibration windows: keep-best (block FT and PV)
    # -- PV-tuning: end-to-end KL distillation from the FP model ------------------------------------
    pv_tuning: bool = False
    pv_epochs: int = 10
    pv_batch_size: int = 8
    pv_lr: float = 3e-4  # codebooks, scales, RMSNorm weights (P step); PV recipe --lr
    pv_code_lr: float = 1e-3  # straight-through latents (V step), betas (0, 0.95); PV's 1e-2 overfit (docs)
    max_code_change_per_step: float = 0.01  # at most this fraction of groups change per update
    pv_update_period: int = 1  # optimizer steps between code updates (the reference: every step)
    pv_beam_size: int = 5  # beam search from a latent (PV's V step, TTVQ's index updates)
    pv_min_lr_ratio: float = 1.0  # cosine floor of the PV stage (1: constant lr)
    pv_teacher_topk: int = 0  # 0: the teacher's full distribution when it fits in 2 GB, else its top 128; k: top k


@dataclass
class AQLMResult:
    layer: VQLinear
    Wq: torch.Tensor  # == layer.dequantize()
    stats: dict = field(default_factory=dict)


def spec_of(M: int, B: int, g: int) -> VQSpec:
    return VQSpec(g, 2**B, num_codebooks=M)


def _seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + 7919 * seed) % (2**31)


def init_codes(Wn: torch.Tensor, spec: VQSpec, cfg: AQLMConfig, hdiag: torch.Tensor | None,
               seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Residual k-means of the rows of Wn (m, n) cut into groups of g (padding weightless):
    codebook m is k-means of what codebooks 0..m-1 left. Returns (M codebooks (K, g) fp32,
    codes (m, nv, M))."""
    m, n = Wn.shape
    g, K, M = spec.vector_len, spec.codebook_size, spec.num_codebooks
    x, mask = to_vectors(Wn, g)
    w = mask
    if hdiag is not None:
        nv = math.ceil(n / g)
        hp = torch.zeros(nv * g, device=Wn.device)
        hp[:n] = hdiag.float() / hdiag.float().mean().clamp_min(1e-30)
        w = hp.reshape(1, nv, g).expand(m, nv, g).reshape(-1, g)
    res = x.clone()
    books, codes = [], []
    for k in range(M):
        r = kmeans(res, K, w, iters=cfg.kmeans_iters, tol=cfg.kmeans_tol, init=cfg.kmeans_init, seed=seed + k)
        C = r.centroids
        idx = nearest(res, C, w)
        books.append(C)
        codes.append(idx)
        res = res - C[idx]
    return books, torch.stack(codes, 1).view(m, -1, M)


def _proxy_and_grads(q: VQLinear, W: torch.Tensor, H: torch.Tensor, codes: list[torch.Tensor]) -> float:
    """tr(ΔW H ΔWᵀ) / m of q (trainable mode) against W, with its gradients w.r.t. the codebooks
    and the row scales written into their .grad (in closed form: dL/dŴ = -2 ΔW H / m; no
    autograd graph, this runs steps_per_epoch times per beam search)."""
    m, n = W.shape
    M, g = q.M, q.vector_len
    books = [getattr(q, f"codebook{k}") for k in range(M)]
    s = q.norm_scale
    with torch.no_grad():
        U = books[0][codes[0]]
        for k in range(1, M):
            U = U + books[k][codes[k]]
        Un = U.reshape(m, -1)[:, :n]
        D = W - s[:, None] * Un
        G = D @ H
        loss = float((D * G).sum()) / m
        gW = G.mul_(-2.0 / m)  # dL/dŴ
        s.grad = (gW * Un).sum(1)
        gU = torch.zeros(m, U.shape[1] * g, dtype=W.dtype, device=W.device)
        gU[:, :n] = gW * s[:, None]
        gU = gU.view(-1, g)
        for k in range(M):
            books[k].grad = torch.zeros_like(books[k]).index_add_(0, codes[k].reshape(-1), gU)
    return loss


def _codes(q: VQLinear) -> torch.Tensor:
    u = q.int_codes()
    return torch.stack([u[f"codes{k}"] for k in range(q.M)], -1)


def _set_codes(q: VQLinear, codes: torch.Tensor) -> None:
    u = q.int_codes()
    for k in range(q.M):
        u[f"codes{k}"].copy_(codes[..., k])


def _beam_pass(q: VQLinear, W: torch.Tensor, H: torch.Tensor, beam_size: int, seed: int) -> dict:
    """Re-encode every code of q (trainable mode) under H: rows in q's normalised domain."""
    s = q.float_param("norm_scale").detach().double()
    target = (W.double() / s[:, None]).float()
    books = [q.float_param(f"codebook{k}").detach() for k in range(q.M)]
    old = _codes(q)
    new, info = beam_search_xtx(target, H, books, old, beam_size=beam_size, seed=seed)
    _set_codes(q, new)
    info["changed"] = float((new != old).any(-1).float().mean())
    return info


@torch.no_grad()
def aqlm_quantize(W: torch.Tensor, H: torch.Tensor, spec: VQSpec, cfg: AQLMConfig, *, name: str = "",
                  bias: torch.Tensor | None = None) -> AQLMResult:
    """Quantize one linear's weight W (m, n) against its input Hessian H (n, n)."""
    t0 = time.time()
    W, H = prepare_hessian(W, H, f"aqlm {name}")  # fp32 W (dead columns zeroed), fp64 H
    m, n = W.shape
    dev = W.device
    seed = _seed(name, cfg.seed)
    M, K, g = spec.num_codebooks, spec.codebook_size, spec.vector_len
    scale = W.norm(dim=1) + 1e-9  # the reference's per-row scale (scale_nbits=0): the row norm
    scale = scale.clamp(torch.finfo(torch.float16).tiny, 65504).half().float()
    books, codes = init_codes(W / scale[:, None], spec, cfg, H.diagonal() if cfg.hessian_kmeans else None, seed)

    q = VQLinear(n, m, g, spec.codebook_sizes, "in", norm="line", norm_bias=False, has_bias=bias is not None).to(dev)
    q.set_codes([codes[..., k] for k in range(M)])
    q.set_norm(scale)
    if bias is not None:
        q.bias.copy_(bias.detach().half())
    q.make_trainable()
    with torch.no_grad():
        for k in range(M):
            getattr(q, f"codebook{k}").copy_(books[k])
            q.norm_scale.copy_(scale)
    params = [getattr(q, f"codebook{k}") for k in range(M)] + [q.norm_scale]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), amsgrad=True, foreach=False, fused=True)
    Hf = H.float()

    def codes_now():
        u = q.int_codes()
        return [u[f"codes{k}"] for k in range(M)]

    stats: dict = {"init": _proxy_and_grads(q, W, Hf, codes_now())}
    best = float("inf")
    epochs = 0
    changed = []
    for epoch in range(cfg.max_epochs):
        cs = codes_now()
        cur = _proxy_and_grads(q, W, Hf, cs)
        if not math.isfinite(cur):
            raise QuantizationError(f"aqlm {name}: calibration loss is {cur}")
        if cur / best > 1.0 - cfg.relative_mse_tolerance:
            break  # as the reference: stop right after a beam search that did not help enough
        best = min(best, cur)
        for step in range(cfg.steps_per_epoch):
            if step:
                _proxy_and_grads(q, W, Hf, cs)
            opt.step()
        changed.append(_beam_pass(q, W, H, cfg.beam_size, seed + 1000 + epoch)["changed"])
        epochs = epoch + 1
    for p in params:
        p.grad = None
    q.round_to_storage()  # what is stored: fp16 codebooks and scales ...
    final = _beam_pass(q, W, H, cfg.beam_size, seed + 999)  # ... and the codes chosen against them
    q.make_stored()
    Wq = q.dequantize()
    if not torch.isfinite(Wq).all():
        raise QuantizationError(f"aqlm {name}: result contains NaN/Inf")
    stats.update(proxy=layer_proxy_loss(W, Wq, H) / m, epochs=epochs, code_change=changed,
                 final_pass_change=final["changed"], seconds=round(time.time() - t0, 3))
    return AQLMResult(layer=q, Wq=Wq, stats=stats)


@METHODS.register("aqlm")
class AQLM(VQMethod):
    Config = AQLMConfig
    needs_hessian = True
    parallel_layers = True
    layer_state_attrs = ("layer_stats",)

    def __init__(self, cfg: AQLMConfig, bits: int):
        super().__init__(cfg, bits)
        check_ranges(cfg, self.name, num_codebooks=">= 0", codebook_bits=">= 0", group_size=">= 0",
                     max_codebooks=">= 1", max_codebook_bits=">= 1", max_group_size=">= 1", kmeans_iters=">= 1",
                     steps_per_epoch=">= 0", max_epochs=">= 0", relative_mse_tolerance="in [0, 1)", beam_size=">= 1",
                     ft_epochs=">= 0", ft_batch_size=">= 1", val_fraction="in [0, 1)", pv_epochs=">= 0",
                     pv_batch_size=">= 1", max_code_change_per_step="in (0, 1]", pv_update_period=">= 1", pv_teacher_topk=">= 0",
                     pv_beam_size=">= 1", lr=">= 0", ft_lr=">= 0", pv_lr=">= 0", pv_code_lr=">= 0")
        if cfg.codebook_bits > 24 or cfg.max_codebook_bits > 24:
            raise ConfigError(f"{self.name}: codebooks of more than 2^24 entries are not supported")
        self.spec: VQSpec | None = None
        self.resolved: Resolved | None = None
        self.layer_stats: dict[str, dict] = {}
        self.ft: dict[int, dict] = {}
        self.pv: dict | None = None

    @property
    def true_sequential(self) -> bool:
        return self.cfg.true_sequential

    @property
    def needs_block_targets(self) -> bool:
        return self.cfg.finetune and self.cfg.ft_epochs > 0

    def teacher_request(self) -> TeacherRequest | None:
        return TeacherRequest(model=True, seed=self.cfg.seed) if self.cfg.pv_tuning else None

    def shape(self) -> dict:
        if self.resolved is None:
            return {}
        s, B = self.resolved.spec, int(math.log2(self.resolved.spec.codebook_size))
        return {**self.resolved.report(self.bits), "codebook_bits": B, "group_size": s.vector_len,
                "name": f"{s.num_codebooks}x{B} g{s.vector_len}"}

    def resolve_shape(self, model: nn.Module) -> None:
        c = self.cfg
        r = resolve(self.bits, model_shapes(model), scope="layer", norm="line", norm_bias=False, orientation="in",
                    num_codebooks=c.num_codebooks, codebook_size=2**c.codebook_bits if c.codebook_bits else 0,
                    vector_len=c.group_size, max_codebook_size=2**c.max_codebook_bits, max_codebooks=c.max_codebooks,
                    vector_lens=tuple(range(2, c.max_group_size + 1)) or (1,))
        self.resolved, self.spec = r, r.spec
        log.info("%s: bits=%d -> %s: %.4f bpw%s", self.name, self.bits, self.shape()["name"], r.bpw,
                 " (over budget)" if r.over_budget else "")

    def prepare(self, model: nn.Module, inputs, teacher) -> None:
        self.resolve_shape(model)
        self._n_params = unique_param_count(model)

    def quantize_layer(self, name: str, layer: nn.Linear, H: torch.Tensor | None) -> nn.Module:
        if self.spec is None:
            raise QuantizationError(f"aqlm {name}: the shape is not resolved (prepare not run?)")
        r = aqlm_quantize(layer.weight.data, H, self.spec, self.cfg, name=name, bias=layer.bias)
        self.layer_stats[name] = r.stats
        r.layer.encoder = BeamEncoder(self.cfg.pv_beam_size)
        log.debug("aqlm %s: proxy %.4g -> %.4g in %d epochs, %.2fs", name, r.stats["init"], r.stats["proxy"],
                  r.stats["epochs"], r.stats["seconds"])
        return r.layer.to(layer.weight.device)

    def finetune_block(self, ctx: BlockContext) -> None:
        """The block's codebooks, scales (and RMSNorm weights) against the FP block's outputs on
        the block's inputs, codes fixed, keep-best on held-out windows."""
        cfg = self.cfg
        if not self.needs_block_targets:
            return
        layers = train_mode(modules_of(ctx.block, VQLinear))
        params = []
        for q in layers.values():
            roles = q.params_by_role()
            params += roles["codebook"] + roles["scale"] + roles["bias"]
        if cfg.ft_rmsnorm:
            params += norm_params(ctx.block)
        try:
            res = distill_block(ctx.block, ctx.inputs.hidden, ctx.targets, ctx.inputs.kwargs_by_bs,
                                [{"params": params, "lr": cfg.ft_lr}],
                                TrainConfig(epochs=cfg.ft_epochs, batch_size=cfg.ft_batch_size, val_fraction=cfg.val_fraction,
                                            min_lr_ratio=1.0, keep_best=True, seed=cfg.seed,
                                            epoch_train_loss=False),  # as the reference: held-out loss per epoch only
                                desc=f"aqlm finetune block {ctx.index}")
        finally:
            stored_mode(layers.values())
        self.ft[ctx.index] = {k: res[k] for k in ("train_before", "train_after", "val_before", "val_after",
                                                  "best_epoch", "steps", "seconds", "n_params")}

    def finalize(self, model: nn.Module, calib_ids: torch.Tensor, teacher) -> None:
        layers = modules_of(model, VQLinear)
        for q in layers.values():  # layers loaded from a resume directory lack the (unstored) encoder
            if q.orientation == "in":
                q.encoder = BeamEncoder(self.cfg.pv_beam_size)
        if self.cfg.pv_tuning and self.cfg.pv_epochs > 0:
            if teacher is None or teacher.model is None:
                raise QuantizationError("aqlm: PV-tuning needs the full-precision teacher")
            self._pv(model, layers, calib_ids, teacher)

    def _pv(self, model: nn.Module, layers: dict[str, VQLinear], calib_ids: torch.Tensor, teacher) -> None:
        """PV-tuning: P step = Adam on codebooks, scales and RMSNorm weights; V step = Adam on
        straight-through latents (started at Ŵ: PV's delta_decay 0) and, every
        `pv_update_period` steps, beam-search re-encoding of the `max_code_change_per_step`
        fraction of each layer's groups whose latent lies farthest from its quantized value."""
        cfg = self.cfg
        train_mode(layers, {n: q.dequantize().detach() for n, q in layers.items()})
        for q in layers.values():
            q.reset_latent()  # exactly Ŵ's lines: the straight-through buffer starts at the quantized weight
        roles = {k: [] for k in ("codebook", "scale", "latent")}
        for q in layers.values():
            r = q.params_by_role()
            roles["codebook"] += r["codebook"]
            roles["scale"] += r["scale"] + r["bias"]
            roles["latent"] += r["latent"]
        pgs = [{"params": roles["codebook"] + roles["scale"], "lr": cfg.pv_lr},
               {"params": norm_params(model), "lr": cfg.pv_lr},
               {"params": roles["latent"], "lr": cfg.pv_code_lr, "betas": (0.0, 0.95)}]
        counts = {"updates": 0, "changed": 0, "n": 0, "max_fraction": 0.0, "cap": 0.0, "rates": []}
        start = {n: _codes(q).clone() for n, q in layers.items()}

        def hook(step: int) -> None:
            if step % cfg.pv_update_period:
                return
            ch = tot = 0
            for q in layers.values():
                r = reencode_moved(q, cfg.max_code_change_per_step, cfg.pv_beam_size)
                ch, tot = ch + r["changed"], tot + r["n"]
                counts["max_fraction"] = max(counts["max_fraction"], r["changed"] / max(r["n"], 1))
                counts["cap"] = max(counts["cap"], math.ceil(cfg.max_code_change_per_step * r["n"]) / max(r["n"], 1))
            counts["updates"] += 1
            counts["changed"] += ch
            counts["rates"].append(ch / max(tot, 1))

        frac = trainable_fraction([p for g in pgs for p in g["params"]], getattr(self, "_n_params", 0) or 1)
        tc = TrainConfig(epochs=cfg.pv_epochs, batch_size=cfg.pv_batch_size, val_fraction=cfg.val_fraction,
                         min_lr_ratio=cfg.pv_min_lr_ratio, keep_best=True, seed=cfg.seed)
        try:
            res = distill_model(model, calib_ids, pgs, tc, teacher=teacher.model, device=teacher.device, desc="aqlm pv",
                                on_step=hook, **teacher_targets_args(cfg.pv_teacher_topk))
        finally:
            stored_mode(layers.values())
        moved = sum(int((_codes(q) != start[n]).any(-1).sum()) for n, q in layers.items())
        n_groups = sum(c.shape[0] * c.shape[1] for c in start.values())
        self.pv = {"kl_before": res["train_before"], "kl_after": res["train_after"], "val_kl_before": res["val_before"],
                   "val_kl_after": res["val_after"], "best_epoch": res["best_epoch"], "steps": res["steps"],
                   "seconds": res["seconds"], "history": res["history"], "code_updates": counts["updates"],
                   "teacher_targets": res["teacher_targets"], "teacher_targets_mb": res["teacher_targets_mb"],
                   "max_change_fraction_per_update": counts["max_fraction"], "allowed_fraction": counts["cap"],
                   "mean_change_rate": sum(counts["rates"]) / max(len(counts["rates"]), 1),
                   "final_code_change": moved / max(n_groups, 1), "trainable_params": frac["trainable"],
                   "trainable_fraction": frac["fraction"]}
        log.info("aqlm pv: KL %.4g -> %.4g (val %.4g -> %.4g), %.2f%% of groups changed, %.1fs", res["train_before"],
                 res["train_after"], res["val_before"], res["val_after"], 100 * self.pv["final_code_change"], res["seconds"])

    def report(self) -> dict:
        out = {"shape": self.shape(),
               "proxy_loss": {n: s["proxy"] for n, s in self.layer_stats.items()},
               "calibration": {n: {k: s[k] for k in ("init", "proxy", "epochs", "final_pass_change", "seconds")}
                               for n, s in self.layer_stats.items()}}
        if self.ft:
            out["finetune"] = self.ft
        if self.pv is not None:
            out["pv"] = self.pv
        return out
