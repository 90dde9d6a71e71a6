"""head=vq_logits: VQ-Logits (Shao et al., arXiv 2505.10202) on the output head.

The output projection W (V x d) becomes K shared codewords C (K x d, K << V) and a map
m: token -> codeword. Logits are computed over the K codewords and gathered to V:

    logits[..., v] = (h @ C.T)[..., m(v)]                      (the paper's form)
    logits[..., v] = s_v * (h @ C.T)[..., m(v)] + b_v          (per_token: 2V more numbers)

Without the per-token terms every token of a cluster gets the same logit, so the model pays
E[log |cluster(y)|] nats of cross-entropy on top of whatever the codewords lose; the report
gives that expectation over the calibration targets (docs/methods/vq_logits.md: over the
evaluation tokens too).

The stage, run after the body is quantized (methods/heads/__init__.py):
  1. hidden states: the final (normed) hidden states of the calibration windows through the
     quantized body (the student's inputs; the body is frozen, so they are computed once), at
     most `max_tokens` positions (seeded), split by window into training and held-out positions.
     teacher=fp_model also takes the FP model's hidden states at the same positions, in
     `prepare`, before the body changes.
  2. init: k-means of the head rows (`metric=weight`: Euclidean, the paper's; `metric=logit`:
     the expected squared logit error on the calibration hidden states, ||(w - c) L||^2 with
     L L^T = E[h h^T]), weighted by the calibration token counts + 1 when `freq_weighted`.
     K = V is the identity (C = W, m = arange): it reproduces the dense head exactly.
     per_token: s_v and b_v start at the least-squares fit of the teacher's logit of v on its
     codeword's logit over the calibration hidden states (closed form from second moments).
  3. distillation on logits through the one training loop (methods/distill.py): Adam on the
     codebook (and s, b), cosine lr, held-out keep-best, loss KL(teacher || student) of the
     next-token distributions (or MSE of the per-position-centred logits).
     teacher=fp_head: the dense head on the quantized body's hidden states (the head's own
     error, the body's left alone; the default); teacher=fp_model: the FP model's logits (the
     head may also absorb some of the body's error).
     train_map: after every epoch every token moves to the codeword that minimises the loss's
     own local model of itself (all tokens at once, the others held): loss=kl a second-order
     expansion of the KL in the token's logit (`assign_kl`: the gradient E[(p_s - p_t) h] and
     the curvature E[p_s (1 - p_s)] from one pass over the training positions), loss=mse the
     expected squared logit error (`assign`: closed form from second moments of the hidden
     states), both under the token's current s_v, b_v; keep-best restores the map with the rest.
  4. the stored layer (VQLogitsLinear, kind "vq_logits") replaces the head. A head tied to the
     input embedding is untied: the embedding stays at the storage dtype and both are counted.

Stored buffers (stored_bits() is their sum, so bpw_model counts them):
  codebook      (K, d) at `dtype` (fp16 by default, like every VQ codebook here)
  token_codes   packed, ceil(log2 K) bits per token (V entries)
  scale, bias   (V,) at `dtype`, when per_token
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttvq_bench.choices import Choice
from ttvq_bench.dtypes import TORCH_DTYPES, DType
from ttvq_bench.errors import ConfigError
from ttvq_kernels.selector import KERNELS, Kernel
from ttvq_kernels.timing import median_ms
from ttvq_methods.distill import TrainConfig, _train, kl_loss, split_windows
from ttvq_methods.heads import HEADS, Head
from ttvq_methods.layers import QuantizedLinear
from ttvq_methods.model_walk import module_device, set_module
from ttvq_methods.packing import pack, packed_nbytes, unpack
from ttvq_methods.registry import LAYERS
from ttvq_methods.vq.kmeans import kmeans

log = logging.getLogger("ttvq")


def code_bits(K: int) -> int:
    """Bits of one token's codeword index: ceil(log2 K), at least 1."""
    return max(1, math.ceil(math.log2(K))) if K > 1 else 1


# -- the stored layer -------------------------------------------------------------------------------
@LAYERS.register("vq_logits")
class VQLogitsLinear(QuantizedLinear):
    """The VQ-Logits head: K codewords, a packed token -> codeword map, optional per-token
    scale and bias. `dequantize()` is the (V, d) matrix it stands for (s_v * C[m(v)]) and
    `bias` the per-token bias, so the torch path (dense matmul) is its oracle; the
    `vq_logits` kernel computes the logits over K and gathers them."""

    kind = "vq_logits"

    def __init__(self, in_features: int, out_features: int, codebook_size: int, per_token: bool = False,
                 dtype: str = "float16", tied: bool = False):
        super().__init__(in_features, out_features, has_bias=per_token)
        if not 1 <= codebook_size <= out_features:
            raise ValueError(f"codebook_size must be in [1, {out_features}], got {codebook_size}")
        self.codebook_size, self.per_token, self.dtype, self.tied = codebook_size, per_token, str(dtype), tied
        dt = TORCH_DTYPES[self.dtype]
        self.register_buffer("codebook", torch.zeros(codebook_size, in_features, dtype=dt))
        self.register_buffer("token_codes", torch.zeros(packed_nbytes(out_features, self.code_bits), dtype=torch.uint8))
        if per_token:
            self.register_buffer("scale", torch.ones(out_features, dtype=dt))
            self.register_buffer("bias", torch.zeros(out_features, dtype=dt))
        self._fwd: dict[str, torch.Tensor] | None = None

    @property
    def code_bits(self) -> int:
        return code_bits(self.codebook_size)

    @property
    def n_params(self) -> int:
        # The weights it stands for: the dense head's, unless that head was the input embedding
        # (tied), which the model still holds and counts. Codebook, map and per-token terms are
        # what is stored for them (stored_bits), not parameters of the model.
        return 0 if self.tied else self.n_weights

    @classmethod
    def from_parts(cls, codebook: torch.Tensor, token_map: torch.Tensor, scale: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, dtype: str = "float16", tied: bool = False) -> "VQLogitsLinear":
        K, d = codebook.shape
        V = token_map.numel()
        layer = cls(d, V, K, per_token=scale is not None, dtype=dtype, tied=tied)
        dt = TORCH_DTYPES[layer.dtype]
        with torch.no_grad():
            layer.codebook.copy_(codebook.detach().to(dt))
            layer.token_codes.copy_(pack(token_map, layer.code_bits))
            if scale is not None:
                layer.scale.copy_(scale.detach().to(dt))
                layer.bias.copy_((bias if bias is not None else torch.zeros(V)).detach().to(dt))
        return layer.to(codebook.device)

    def token_map(self) -> torch.Tensor:
        """The codeword of every token, int64 (V,)."""
        return unpack(self.token_codes, self.code_bits, self.out_features).to(self.token_codes.device)

    def dequantize(self) -> torch.Tensor:
        w = self.codebook.float()[self.token_map()]
        return w * self.scale.float()[:, None] if self.per_token else w

    def meta(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "codebook_size": self.codebook_size,
                "per_token": self.per_token, "dtype": self.dtype, "tied": self.tied}

    def clear_cache(self) -> None:
        super().clear_cache()
        self._fwd = None

    def forward_parts(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What the kernel needs, in the activations' dtype (unpacked map as int64); cached in
        eval mode, like the torch path's dequantized weight (never saved, never counted)."""
        f = self._fwd
        if f is not None and f["codebook"].dtype == dtype and f["map"].device == self.codebook.device and not self.training:
            return f
        parts = {"codebook": self.codebook.to(dtype), "map": self.token_map()}
        if self.per_token:
            parts.update(scale=self.scale.to(dtype), bias=self.bias.to(dtype))
        if not self.training:
            self._fwd = parts
        return parts

    def bits_by_part(self) -> dict[str, int]:
        return {name: t.numel() * t.element_size() * 8 for name, t in self.state_dict().items()}

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, K={self.codebook_size}, per_token={self.per_token}, "
                f"kind={self.kind}, bits={self.stored_bits()}")


def vq_logits(x: torch.Tensor, codebook: torch.Tensor, token_map: torch.Tensor, scale: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits over the K codewords, gathered to V (and s * l + b per token)."""
    out = F.linear(x, codebook).index_select(-1, token_map)
    if scale is None:
        return out
    if torch.is_grad_enabled() and (out.requires_grad or scale.requires_grad or bias.requires_grad):
        return torch.addcmul(bias, out, scale)
    return torch.addcmul(bias, out, scale, out=out)  # in place: the same values, no second (.., V) tensor


@KERNELS.register("vq_logits")
class VQLogitsKernel(Kernel):
    """x @ C.T over the K codewords, then a gather to V (and the per-token fma): K·d + V work
    per token instead of V·d."""

    priority = 20

    @staticmethod
    def supports(layer, x: torch.Tensor) -> bool:
        return isinstance(layer, VQLogitsLinear) and x.shape[-1] == layer.in_features

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        p = layer.forward_parts(x.dtype)
        return vq_logits(x, p["codebook"], p["map"], p.get("scale"), p.get("bias"))


# -- the head stage ------------------------------------------------------------------------------------
class Teacher(Choice):
    fp_head = "fp_head"  # the dense head on the quantized body's hidden states (the head's own error only)
    fp_model = "fp_model"  # the full-precision model's logits (FP hidden states kept before the body changes)


class Loss(Choice):
    kl = "kl"  # KL(teacher || student) of the next-token distributions
    mse = "mse"  # squared error of the logits, each position centred (softmax ignores a shift)


class Metric(Choice):
    weight = "weight"  # Euclidean distance of head rows (the paper's k-means)
    logit = "logit"  # expected squared logit error on the calibration hidden states


@dataclass
class VQLogitsConfig:
    name: str = "vq_logits"
    K: int = 64  # codewords (K = V with training off reproduces the dense head exactly)
    per_token: bool = False  # a scale and a bias per token (2V numbers at `dtype`, counted)
    freq_weighted: bool = True  # k-means weights: calibration token counts + 1 (false: the paper's plain k-means)
    metric: Metric = Metric.logit  # k-means distance of the init
    train_map: bool = True  # re-assign tokens to codewords after every epoch (the loss's rule: assign_kl / assign)
    teacher: Teacher = Teacher.fp_head
    loss: Loss = Loss.kl
    epochs: int = 20  # 0: the init only
    lr: float = 3e-3  # Adam, codebook
    lr_per_token: float = 1e-1  # Adam, scale and bias
    batch_tokens: int = 512  # positions per step
    max_tokens: int = 32768  # calibration positions used (seeded subsample; the hidden states are kept in memory)
    val_fraction: float = 0.1  # held-out calibration windows (keep-best)
    kmeans_iters: int = 100
    dtype: DType = DType.float16  # codebook, scale and bias as stored
    seed: int = 0
    timing: bool = True  # time the logits against the dense head at this model's size (head_report.timing)


def _check(cfg: VQLogitsConfig) -> None:
    bad = [(cfg.K < 1, f"head.K={cfg.K} must be >= 1"),
           (cfg.epochs < 0, f"head.epochs={cfg.epochs} must be >= 0"),
           (not cfg.lr > 0, f"head.lr={cfg.lr} must be > 0"),
           (not cfg.lr_per_token > 0, f"head.lr_per_token={cfg.lr_per_token} must be > 0"),
           (cfg.batch_tokens < 1, f"head.batch_tokens={cfg.batch_tokens} must be >= 1"),
           (cfg.max_tokens < 2, f"head.max_tokens={cfg.max_tokens} must be >= 2"),
           (not 0 <= cfg.val_fraction < 1, f"head.val_fraction={cfg.val_fraction} must be in [0, 1)"),
           (cfg.kmeans_iters < 1, f"head.kmeans_iters={cfg.kmeans_iters} must be >= 1")]
    for cond, msg in bad:
        if cond:
            raise ConfigError(f"vq_logits: {msg}")


def output_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the model's output projection."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"vq_logits: the model's output head is a {type(head).__name__}, not a dense linear "
                          "(already replaced?)")
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


@torch.no_grad()
def final_hidden(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor | None = None,
                 batch_size: int = 8) -> torch.Tensor:
    """The hidden states the output head sees (after the final norm), fp32 on CPU: (n, seqlen, d),
    or only the rows of the flat positions (window * seqlen + t) given, (len(positions), d)."""
    dev = module_device(model)
    n, T = ids.shape
    out = []
    for i in range(0, n, batch_size):
        h = model.model(input_ids=ids[i : i + batch_size].to(dev), use_cache=False).last_hidden_state.float().cpu()
        if positions is not None:
            p = positions[(positions >= i * T) & (positions < (i + batch_size) * T)] - i * T
            h = h.reshape(-1, h.shape[-1])[p]
        out.append(h)
    return torch.cat(out)


def _positions(n: int, seqlen: int, cfg: VQLogitsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (window * seqlen + t) positions for training and held-out, split by window, at
    most max_tokens in all (seeded)."""
    tr_w, va_w = split_windows(n, cfg.val_fraction, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    out = []
    for w in (tr_w, va_w):
        pos = (w[:, None] * seqlen + torch.arange(seqlen)).reshape(-1)
        cap = int(round(cfg.max_tokens * len(w) / n))
        if pos.numel() > cap:
            pos = pos[torch.randperm(pos.numel(), generator=g)[:cap]].sort().values
        out.append(pos)
    return out[0], out[1]


class Moments:
    """Second moments of the student's (hs) and teacher's (ht) hidden states over the training
    positions: G = E[hs hs^T], mu = E[hs], X = E[hs ht^T], mu_t = E[ht]. Everything the
    closed-form map updates and per-token fits need."""

    def __init__(self, hs: torch.Tensor, ht: torch.Tensor | None):
        n = hs.shape[0]
        self.G = hs.T @ hs / n
        self.mu = hs.mean(0)
        self.X = self.G if ht is None else hs.T @ ht / n
        self.mu_t = self.mu if ht is None else ht.mean(0)


def _chunks(V: int, K: int):
    step = max(1, (1 << 22) // max(K, 1))
    return range(0, V, step), step


@torch.no_grad()
def assign(C: torch.Tensor, W: torch.Tensor, mom: Moments, s: torch.Tensor | None = None,
           b: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's codeword with the lowest expected squared logit error
    E[(s_v h.c_k + b_v - t_v)^2] (t_v the teacher's logit), s = 1, b = 0 without per-token terms."""
    V, K = W.shape[0], C.shape[0]
    A = ((C @ mom.G) * C).sum(1)  # E[(h.c_k)^2]
    B = C @ mom.mu  # E[h.c_k]
    CX = C @ mom.X  # E[(h.c_k) (ht . w)] = CX @ w
    out = torch.empty(V, dtype=torch.long, device=W.device)
    starts, step = _chunks(V, K)
    for i in starts:
        Q = CX @ W[i : i + step].T  # (K, v)
        if s is None:
            err = A[:, None] - 2 * Q
        else:
            sv, bv = s[i : i + step][None], b[i : i + step][None]
            err = sv * sv * A[:, None] + 2 * sv * bv * B[:, None] - 2 * sv * Q
        out[i : i + step] = err.argmin(0)
    return out


@torch.no_grad()
@torch.no_grad()
def assign_kl(C: torch.Tensor, token_map: torch.Tensor, s: torch.Tensor | None, grad_h: torch.Tensor, curv: torch.Tensor,
              G: torch.Tensor) -> torch.Tensor:
    """Each token's codeword by a second-order expansion of KL(teacher || student) in its own
    logit: moving v from c = C[m(v)] to c_k changes its logit by D = s_v h.(c_k - c), and
        dKL ~ s_v (c_k - c).E[(p_s,v - p_t,v) h] + 1/2 s_v^2 E[p_s,v (1 - p_s,v)] (c_k - c)^T G (c_k - c)
    (grad_h = E[(p_s - p_t) h] (V, d), curv = E[p_s (1 - p_s)] (V,), G = E[h h^T]; the curvature
    is decoupled from h). A token moves only when that predicts a decrease."""
    V, K = token_map.numel(), C.shape[0]
    sv = torch.ones(V, device=C.device) if s is None else s
    CG = C @ G
    A = (CG * C).sum(1)  # c_k^T G c_k
    M = CG @ C.T  # c_k^T G c_j
    out = torch.empty(V, dtype=torch.long, device=C.device)
    starts, step = _chunks(V, K)
    for i in starts:
        m, gv = token_map[i : i + step], grad_h[i : i + step]
        lin = C @ gv.T - (C[m] * gv).sum(1)[None]  # (K, v): (c_k - c_m).E[g h]
        quad = A[:, None] - 2 * M[:, m] + A[m][None]  # (K, v): (c_k - c_m)^T G (c_k - c_m)
        s_ = sv[i : i + step][None]
        out[i : i + step] = (s_ * lin + 0.5 * s_ * s_ * curv[i : i + step][None] * quad).argmin(0)
    return out


def fit_per_token(C: torch.Tensor, token_map: torch.Tensor, W: torch.Tensor, mom: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares s_v, b_v of the teacher's logit of v on its codeword's logit."""
    A = ((C @ mom.G) * C).sum(1)[token_map]
    Ea = (C @ mom.mu)[token_map]
    Et = W @ mom.mu_t
    Eat = ((C @ mom.X)[token_map] * W).sum(1)
    var = (A - Ea * Ea).clamp_min(0)
    cov = Eat - Ea * Et
    s = torch.where(var > 1e-12 * A.clamp_min(1e-30), cov / var.clamp_min(1e-30), torch.ones_like(cov))
    return s, Et - s * Ea


def cluster_stats(token_map: torch.Tensor, targets: torch.Tensor, K: int) -> dict:
    """E[log |cluster(y)|] (nats) over the target tokens y, and the cluster sizes."""
    sizes = torch.bincount(token_map, minlength=K)
    y = targets.reshape(-1)
    return {"e_log_cluster_size": float(sizes[token_map[y]].double().log().mean()) if y.numel() else float("nan"),
            "n_targets": int(y.numel()), "used_codewords": int((sizes > 0).sum()), "max_cluster": int(sizes.max()),
            "singletons": int((sizes == 1).sum())}


class _Student(nn.Module):
    """The trainable form: codebook (and s, b) as parameters, the map as an int64 buffer."""

    def __init__(self, C: torch.Tensor, token_map: torch.Tensor, s: torch.Tensor | None, b: torch.Tensor | None):
        super().__init__()
        self.codebook = nn.Parameter(C.clone().float())
        self.register_buffer("token_map", token_map.clone())
        self.scale = nn.Parameter(s.clone().float()) if s is not None else None
        self.bias = nn.Parameter(b.clone().float()) if b is not None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return vq_logits(h, self.codebook, self.token_map, self.scale, self.bias)


def time_logits(layer: VQLogitsLinear, W: torch.Tensor, tokens: tuple[int, ...] = (1, 256), repeats: int = 20) -> dict:
    """Median time of the VQ-Logits head and of the dense head (F.linear) on the same random
    activations, at each token count, on the layer's device and this process's threads: `vq_ms`
    through the layer (kernel selection included, what the model pays), `vq_kernel_ms` the
    computation alone."""
    dev = W.device
    layer = layer.eval()
    rows = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in tokens:
            x = torch.randn(n, layer.in_features, generator=g).to(dev)
            p = layer.forward_parts(x.dtype)
            ms_vq, how = median_ms(lambda: layer(x), dev, repeats=repeats)
            ms_raw, _ = median_ms(lambda: vq_logits(x, p["codebook"], p["map"], p.get("scale"), p.get("bias")), dev,
                                  repeats=repeats)
            ms_dense, _ = median_ms(lambda: F.linear(x, W), dev, repeats=repeats)
            rows[str(n)] = {"vq_ms": round(ms_vq, 5), "vq_kernel_ms": round(ms_raw, 5), "dense_ms": round(ms_dense, 5),
                            "speedup": round(ms_dense / ms_vq, 3), "kernel_speedup": round(ms_dense / ms_raw, 3)}
    return {"tokens": rows, "threads": torch.get_num_threads(), "device": str(dev), "timer": how["timer"],
            "shape": [layer.out_features, layer.in_features]}


@HEADS.register("vq_logits")
class VQLogitsHead(Head):
    Config = VQLogitsConfig
    needs_calibration = True

    def __init__(self, cfg: VQLogitsConfig):
        super().__init__(cfg)
        _check(cfg)
        self._fp_hidden: torch.Tensor | None = None

    # -- before the body changes -------------------------------------------------------------------
    def prepare(self, model: nn.Module, calib_ids: torch.Tensor) -> None:
        _, head = output_head(model)
        if self.cfg.K > head.out_features:
            raise ConfigError(f"vq_logits: head.K={self.cfg.K} exceeds the vocabulary ({head.out_features} tokens)")
        if self.cfg.teacher == Teacher.fp_model:
            tr, va = _positions(*calib_ids.shape, self.cfg)
            self._fp_hidden = final_hidden(model, calib_ids, torch.cat([tr, va]).sort().values)

    # -- after it ----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, calib_ids: torch.Tensor) -> dict:
        cfg = self.cfg
        t0 = time.time()
        name, head = output_head(model)
        V, d = head.weight.shape
        if cfg.K > V:
            raise ConfigError(f"vq_logits: head.K={cfg.K} exceeds the vocabulary ({V} tokens)")
        tied = head.weight is model.get_input_embeddings().weight
        W = head.weight.detach().float().clone()
        if cfg.teacher == Teacher.fp_model and self._fp_hidden is None:  # prepare() not called: no FP states
            raise ConfigError("vq_logits: head.teacher=fp_model needs the FP hidden states from before the body "
                              "was quantized (Head.prepare)")
        tr, va = _positions(*calib_ids.shape, cfg)
        used = torch.cat([tr, va]).sort().values  # the rows kept; tr and va become indices into them
        hs = final_hidden(model, calib_ids, used)
        tr, va = torch.searchsorted(used, tr), torch.searchsorted(used, va)
        ht, self._fp_hidden = self._fp_hidden, None
        mom = Moments(hs[tr], None if ht is None else ht[tr])
        counts = torch.bincount(calib_ids[:, 1:].reshape(-1), minlength=V)[:V].float()

        C, token_map, init_info = self._init(W, mom, counts)
        s = b = None
        if cfg.per_token:
            s, b = (torch.ones(V), torch.zeros(V)) if cfg.K == V else fit_per_token(C, token_map, W, mom)
        student = _Student(C, token_map, s, b)
        train = self._distill(student, hs, ht, W, tr, va, mom)

        p = {k: v.detach() for k, v in student.state_dict().items()}
        layer = VQLogitsLinear.from_parts(p["codebook"], p["token_map"], p.get("scale"), p.get("bias"),
                                          dtype=str(cfg.dtype), tied=tied).eval()
        # The stored (rounded) head on the held-out positions, against the same teacher.
        loss_fn = self._loss_fn()
        train["val_stored"] = self._mean_loss(lambda h: layer(h), hs, ht, W, va, loss_fn)
        with torch.no_grad():
            set_module(model, name, layer.to(head.weight.device))
        if tied:
            model.config.tie_word_embeddings = False  # the embedding stays; nothing may re-tie a head it no longer is

        sbits = torch.finfo(TORCH_DTYPES[self.storage_dtype]).bits
        parts = layer.bits_by_part()
        after_params = cfg.K * d + (2 * V if cfg.per_token else 0)
        report = {
            "name": name, "V": V, "d": d, "K": cfg.K, "tied": tied, "per_token": cfg.per_token,
            "teacher": str(cfg.teacher), "loss": str(cfg.loss), "metric": str(cfg.metric),
            "head_params_before": V * d, "head_bits_before": V * d * sbits, "storage_dtype": self.storage_dtype,
            "head_params_after": after_params, "head_bits_after": layer.stored_bits(), "head_bits_by_part": parts,
            "code_bits": layer.code_bits,
            "param_reduction": 1 - after_params / (V * d), "bit_reduction": 1 - layer.stored_bits() / (V * d * sbits),
            # a tied head's matrix is the embedding, which stays: the model gains the head's bits
            "model_bits_added": layer.stored_bits() - (0 if tied else V * d * sbits),
            "init": init_info, "train": train,
            "clusters_calib": cluster_stats(layer.token_map(), calib_ids[:, 1:], cfg.K),
        }
        if cfg.timing:
            report["timing"] = time_logits(layer, W.to(head.weight.device))
        report["seconds"] = round(time.time() - t0, 3)
        log.info("vq_logits: K=%d per_token=%s: head %d -> %d bits, held-out %s %.4g -> %.4g (stored %.4g), "
                 "E[log cluster] %.3f", cfg.K, cfg.per_token, V * d * sbits, layer.stored_bits(), cfg.loss,
                 train["val_before"], train["val_after"], train["val_stored"],
                 report["clusters_calib"]["e_log_cluster_size"])
        return report

    # -- pieces ------------------------------------------------------------------------------------
    def _init(self, W: torch.Tensor, mom: Moments, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        cfg = self.cfg
        V, d = W.shape
        if cfg.K == V:  # the identity: exact
            return W.clone(), torch.arange(V), {"kind": "identity"}
        weights = counts + 1 if cfg.freq_weighted else None
        if cfg.metric == Metric.logit:
            G = mom.G.double()
            L = torch.linalg.cholesky(G + 1e-6 * G.diagonal().mean() * torch.eye(d, dtype=G.dtype))
            res = kmeans((W.double() @ L).float(), cfg.K, weights, iters=cfg.kmeans_iters, seed=cfg.seed)
            C = torch.linalg.solve_triangular(L, res.centroids.double(), upper=False, left=False).float()  # C L = C_y
        else:
            res = kmeans(W, cfg.K, weights, iters=cfg.kmeans_iters, seed=cfg.seed)
            C = res.centroids
        return C, res.labels.cpu(), {"kind": "kmeans", "metric": str(cfg.metric), "freq_weighted": cfg.freq_weighted,
                                     "iters": res.n_iter, "inertia": res.inertia}

    def _loss_fn(self):
        if self.cfg.loss == Loss.kl:
            return kl_loss

        def mse(student, teacher):
            return F.mse_loss(student - student.mean(-1, keepdim=True), teacher - teacher.mean(-1, keepdim=True))

        return mse

    @torch.no_grad()
    def _mean_loss(self, fn, hs, ht, W, pos, loss_fn) -> float:
        if pos.numel() == 0:
            return float("nan")
        tot, step = 0.0, max(self.cfg.batch_tokens, 4096)
        for i in range(0, pos.numel(), step):
            p = pos[i : i + step]
            teach = (hs if ht is None else ht)[p] @ W.T
            tot += float(loss_fn(fn(hs[p]).float(), teach)) * p.numel()
        return tot / pos.numel()

    @torch.no_grad()
    def _kl_stats(self, student, hs, ht, W, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """E[(p_s - p_t) h] (V, d) and E[p_s (1 - p_s)] (V,) over the positions."""
        V, d = W.shape
        grad_h, curv = torch.zeros(V, d), torch.zeros(V)
        step = max(self.cfg.batch_tokens, 4096)
        for i in range(0, pos.numel(), step):
            p = pos[i : i + step]
            ps = torch.softmax(student(hs[p]).float(), -1)
            pt = torch.softmax((hs if ht is None else ht)[p] @ W.T, -1)
            grad_h += (ps - pt).T @ hs[p]
            curv += (ps * (1 - ps)).sum(0)
        return grad_h / pos.numel(), curv / pos.numel()

    def _distill(self, student: _Student, hs, ht, W, tr, va, mom) -> dict:
        cfg = self.cfg
        loss_fn = self._loss_fn()
        groups = [{"params": [student.codebook], "lr": cfg.lr}]
        if student.scale is not None:
            groups.append({"params": [student.scale, student.bias], "lr": cfg.lr_per_token})
        # K = V against the dense head is exact already (a float KL can dip below 0 and "win")
        exact = student.codebook.shape[0] == W.shape[0] and cfg.teacher == Teacher.fp_head
        tc = TrainConfig(epochs=0 if exact else cfg.epochs, batch_size=cfg.batch_tokens, val_fraction=0.0, seed=cfg.seed)
        map0 = student.token_map.clone()

        def step_loss(sel):
            p = tr[sel]
            with torch.no_grad():
                teach = (hs if ht is None else ht)[p] @ W.T
            return loss_fn(student(hs[p]), teach)

        def eval_loss(train: bool = True):
            return (self._mean_loss(student, hs, ht, W, tr, loss_fn) if train else float("nan"),
                    self._mean_loss(student, hs, ht, W, va, loss_fn))

        def on_epoch(_epoch):
            if not cfg.train_map or cfg.K == W.shape[0]:
                return
            C = student.codebook.detach()
            s = None if student.scale is None else student.scale.detach()
            if cfg.loss == Loss.kl:
                grad_h, curv = self._kl_stats(student, hs, ht, W, tr)
                student.token_map.copy_(assign_kl(C, student.token_map, s, grad_h, curv, mom.G))
            else:
                b = None if student.bias is None else student.bias.detach()
                student.token_map.copy_(assign(C, W, mom, s, b))

        def state():
            return [p for p in student.parameters()] + [student.token_map]

        res = _train(student, groups, tr.numel(), step_loss, eval_loss, tc, state, None, on_epoch, "vq_logits")
        res.update(n_train=int(tr.numel()), n_val=int(va.numel()),
                   map_moved=float((student.token_map != map0).float().mean()))
        return res
