"""JLCM: jointly learnable codebooks and mappings (Yvinec, Dapogny, Bailly, arXiv 2309.17361).
What it does, every choice where the paper is open, and the measurements: docs/methods/jlcm.md.

Per linear W (out, in):
  1. Grouping. The output rows (neurons) are grouped by a statistic of their weights
     (`group_stat`: std, absmax, or the row's quantile profile) into G groups, and reordered so
     that each group is contiguous: the stored rows are W[perm], perm = stable argsort(group ids).
  2. Codebooks. Each group gets its own codebook of K codewords of d values (`group_mode:
     codebook`, the paper's multi-codebook setting) or all groups share one codebook with an fp16
     scale per group (`group_mode: scale`). d = 1 is the paper's scalar codebook, d > 1 its VQ
     variant (vectors run along the inputs of a row, so a vector lies in one group). Codebooks
     start from a (Hessian-weighted) k-means of the group's vectors; the mappings (codes) from the
     OBS column loop (`assign: obs`, GPTQ's error feedback with each row rounded to its own
     group's codebook) or the nearest codeword (`assign: nearest`).
  3. Joint learning (`finetune`). After a block's linears are quantized, codebooks, scales and
     a straight-through latent weight train against full-precision block outputs (`block_targets`:
     the FP model's hidden state after the block, or the FP block on the block's inputs) in the
     shared loop (distill.distill_block); every `update_period` steps each vector's code moves by
     the proximal rule (`proximal`: only to one of the k nearest codewords of its current one, or
     to the minimiser of |z - c_j|^2 + lambda |c_j - c_cur|^2), never to a far codeword because
     the latent drifted.
  4. Stored form (`JLCMLinear`, layer kind "jlcm"): codebooks (G, K, d) fp16 (or (1, K, d) and a
     (G,) fp16 scale), codes (ceil(log2 K) bits per vector), the group id of every row
     (ceil(log2 G) bits per row: the permutation, since perm = stable argsort of the ids), bias.
     Nothing else; stored_bits() is their sum and the record's bpw counts every one of them.

`bits` is a budget for the record's bpw: K, G (and d when `vector_len=0`) are resolved from it on
the model's own layer shapes by the shared budget rule of methods/vq/budget.py (the highest index
rate within the budget, then the longest vectors, then the most specific codebooks, i.e. the
most groups, then the lowest bpw; at most bits + BUDGET_SLACK), counted exactly from meta-device
JLCM layers (`resolve_shape`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ttvq_bench.choices import Choice
from ttvq_bench.errors import ConfigError, QuantizationError
from ttvq_methods.base import BlockContext, Method, TeacherRequest, check_ranges
from ttvq_methods.distill import TrainConfig, distill_block
from ttvq_methods.layers import QuantizedLinear
from ttvq_methods.model_walk import modules_of, norm_params
from ttvq_methods.packing import pack, packed_nbytes, unpack
from ttvq_methods.registry import LAYERS, METHODS
from ttvq_methods.second_order import layer_proxy_loss, obs_quantize, prepare_hessian
from ttvq_methods.vq.budget import LinearShape, model_shapes, select
from ttvq_methods.vq.index_updates import IndexUpdates
from ttvq_methods.vq.kmeans import KMeansInit, kmeans, nearest
from ttvq_methods.vq.layer import index_bits, to_vectors

log = logging.getLogger(__name__)


# -- closed choices (docs/methods/jlcm.md says what each does) ------------------------------------
class GroupStat(Choice):
    std = "std"  # rows sorted by their standard deviation, cut into G equal-size groups
    absmax = "absmax"  # ... by their largest magnitude
    quantiles = "quantiles"  # k-means (G clusters) of the rows' quantile functions (W2 between their distributions)


class GroupMode(Choice):
    codebook = "codebook"  # one codebook per group (the paper's multi-codebook form)
    scale = "scale"  # one codebook per layer, one fp16 scale per group


class Assign(Choice):
    obs = "obs"  # GPTQ's column loop with error feedback, each row rounded to its group's codebook
    nearest = "nearest"  # nearest codeword of the weight itself


class Proximal(Choice):
    knn = "knn"  # a code may move only to one of the k nearest codewords of its current one
    penalty = "penalty"  # argmin_j |z - c_j|^2 + lambda |c_j - c_cur|^2 (a proximal step)
    none = "none"  # nearest codeword of the latent (TTVQ's latent update)


class BlockTarget(Choice):
    block = "block"  # the FP block on the block's (quantized-prefix) inputs: BlockContext.targets
    model = "model"  # the FP model's own hidden state after the block (teacher trajectory)


@dataclass
class JLCMConfig:
    name: str = "jlcm"
    # -- shape: 0 = resolved from the bits budget (docstring, resolve_shape) --------------------
    vector_len: int = 1  # d: 1 = the paper's scalar codebook; 0 = the longest the budget buys
    codebook_size: int = 0  # K codewords per group
    num_groups: int = 0  # G groups of rows per linear (at most its number of rows)
    max_groups: int = 64  # the most groups the budget rule considers
    max_codebook_size: int = 4096  # the largest K the budget rule considers
    max_vector_len: int = 12  # the longest d the budget rule considers (vector_len=0)
    group_mode: GroupMode = GroupMode.codebook
    group_stat: GroupStat = GroupStat.std
    # -- initial codebooks and mappings ---------------------------------------------------------
    assign: Assign = Assign.obs
    hessian_kmeans: bool = True  # k-means weights each entry by H_jj of its input column
    kmeans_iters: int = 100
    kmeans_tol: float = 1e-5
    kmeans_init: KMeansInit = KMeansInit.kmeanspp
    percdamp: float = 0.01
    blocksize: int = 128  # lazy-update width of the column loop: speed only
    true_sequential: bool = True
    seed: int = 0
    # -- joint learning of codebooks and mappings (block distillation) --------------------------
    finetune: bool = True
    block_targets: BlockTarget = BlockTarget.model
    epochs: int = 10
    batch_size: int = 8
    relative_lr: bool = False  # true: each layer's rates times the RMS of what they move (see finetune_block);
    # measured worse at 2 bits (docs/methods/jlcm.md), so off: the rates are absolute
    lr_latent: float = 2e-3
    lr_codebook: float = 1e-3
    lr_scale: float = 1e-3  # group scales (group_mode=scale) and biases
    train_norms: bool = False  # the block's RMSNorm weights train too (beyond the paper)
    lr_norm: float = 1e-3
    update_period: int = 10  # optimizer steps between mapping updates
    update_fraction: float = 1.0  # at most this fraction of the codes move per update
    proximal: Proximal = Proximal.knn
    proximal_k: int = 1  # knn: the k nearest other codewords of the current one (0: frozen codes)
    proximal_lambda: float = 1.0  # penalty: weight of the distance to the current codeword
    val_fraction: float = 0.1  # held-out calibration windows (keep-best, reported losses)
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0


# -- the proximal mapping rule ---------------------------------------------------------------------
@dataclass(frozen=True)
class ProximalRule:
    kind: str = "none"
    k: int = 1
    lam: float = 1.0


def neighbours(C: torch.Tensor, k: int) -> torch.Tensor:
    """(K, min(k, K-1)) indices: for each codeword its k nearest other codewords (squared
    Euclidean distance, ties to the lower index). Row i never contains i."""
    K = C.shape[0]
    k = min(k, K - 1)
    D = torch.cdist(C.float(), C.float()) ** 2
    D.fill_diagonal_(-1.0)  # itself first, then dropped
    order = torch.sort(D, dim=1, stable=True).indices
    return order[:, 1 : k + 1]


@torch.no_grad()
def proximal_codes(x: torch.Tensor, C: torch.Tensor, cur: torch.Tensor, rule: ProximalRule,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """The code each vector of x (N, d) would take under `rule`, from its current code cur (N,)
    into codebook C (K, d); padded entries (mask 0) never decide. It may equal cur; the caller
    moves a code only where the new codeword is strictly closer to x.
      none:    the nearest codeword.
      knn:     the nearest among cur and its k nearest other codewords (`neighbours`).
      penalty: argmin_j |x - c_j|^2 + lam |c_j - c_cur|^2, i.e. the codeword nearest to
               (x + lam c_cur) / (1 + lam): a move by Δ costs lam |Δ|^2, so a code never moves
               farther than |x - c_cur| / sqrt(lam)."""
    x, C = x.float(), C.float()
    if rule.kind == "none":
        return nearest(x, C, mask)
    if rule.kind == "penalty":
        return nearest((x + rule.lam * C[cur]) / (1 + rule.lam), C, mask)
    if rule.kind != "knn":
        raise ValueError(f"unknown proximal rule {rule.kind!r}")
    if rule.k <= 0 or C.shape[0] < 2:
        return cur.clone()
    cand = torch.cat([cur[:, None], neighbours(C, rule.k)[cur]], 1)  # (N, 1 + k)
    m = torch.ones_like(x) if mask is None else mask
    dist = (((x[:, None, :] - C[cand]) ** 2) * m[:, None, :]).sum(-1)
    return cand.gather(1, dist.argmin(1, keepdim=True)).squeeze(1)  # ties: cur (column 0)


# -- grouping --------------------------------------------------------------------------------------
N_QUANTILES = 32  # group_stat=quantiles: levels of each row's quantile function
KMEANS_RESTARTS = 8  # ... and k-means restarts (the best inertia wins)


def layer_groups(num_groups: int, out_features: int) -> int:
    """Groups of one linear: G, at most one per row."""
    return max(1, min(num_groups, out_features))


@torch.no_grad()
def group_rows(W: torch.Tensor, G: int, stat: str = "std", seed: int = 0) -> torch.Tensor:
    """Group id (out,) in 0..G-1 of every row of W: rows with similar weight distributions share
    a group. std/absmax: rows sorted by the statistic (ties by index) and cut into G groups of
    equal size (±1), group 0 the smallest; quantiles: k-means of the rows' quantile functions
    (the distance of two rows is a sampled W2 distance of their value distributions), clusters
    renumbered by their mean std (group sizes vary)."""
    W = W.detach().float()
    out = W.shape[0]
    G = layer_groups(G, out)
    if G == 1:
        return torch.zeros(out, dtype=torch.long, device=W.device)
    if stat in ("std", "absmax"):
        s = W.std(1, unbiased=False) if stat == "std" else W.abs().amax(1)
        order = torch.sort(s, stable=True).indices
        g = torch.empty(out, dtype=torch.long, device=W.device)
        g[order] = torch.arange(out, device=W.device) * G // out
        return g
    if stat != "quantiles":
        raise ValueError(f"unknown group statistic {stat!r}")
    # A row's distribution as its quantile function at N_QUANTILES levels: the squared distance
    # of two rows' profiles is (a sampled) squared Wasserstein-2 distance of their value
    # distributions, what a shared scalar codebook pays for mixing them. Best of KMEANS_RESTARTS.
    levels = (torch.arange(N_QUANTILES, device=W.device, dtype=torch.float32) + 0.5) / N_QUANTILES
    feats = torch.quantile(W, levels, dim=1).T.contiguous()  # (out, N_QUANTILES)
    runs = [kmeans(feats, G, iters=100, tol=1e-6, init="kmeanspp", seed=seed + r) for r in range(KMEANS_RESTARTS)]
    labels = min(runs, key=lambda r: r.inertia).labels
    std = W.std(1, unbiased=False)
    means = torch.stack([std[labels == c].mean() if (labels == c).any() else std.new_tensor(float("inf"))
                         for c in range(G)])
    rank = torch.empty(G, dtype=torch.long, device=W.device)
    rank[torch.sort(means, stable=True).indices] = torch.arange(G, device=W.device)
    return rank[labels]


def permutation(groups: torch.Tensor) -> torch.Tensor:
    """The row order that makes every group contiguous: stable argsort of the group ids, so the
    ids alone determine it (within a group rows keep their original order)."""
    return torch.sort(groups, stable=True).indices


# -- the stored (and trainable) layer ---------------------------------------------------------------
@LAYERS.register("jlcm")
class JLCMLinear(QuantizedLinear):
    """A linear whose output rows are grouped, each group with its own codebook (or scale).

    Stored buffers (state_dict() is exactly this list; stored_bits() is their sum):
      codebooks    (G, K, d) fp16 for group_mode "codebook"; (1, K, d) for "scale"
      codes0       packed, ceil(log2 K) bits per vector: rows in grouped order (group 0's rows
                   first), each row cut into ceil(in/d) vectors along the inputs (the padded last
                   vector's index is stored and counted)
      groups       packed, ceil(log2 G) bits per row, in the original row order (absent if G = 1):
                   the permutation, perm = stable argsort(groups)
      group_scale  (G,) fp16, group_mode "scale" only
      bias         (out,) fp16, when the linear has one
    Reconstruction (fp32): row r of the grouped order is codebooks[g_r][codes[r]] concatenated,
    trimmed to `in`, times group_scale[g_r] ("scale"); row perm[r] of W is grouped row r.

    Trainable mode (`make_trainable`, back with `make_stored`): codebooks, scales and bias become
    fp32 Parameters, codes an int64 buffer, and an optional latent Z (the rows in grouped order,
    divided by their group scale) a Parameter; the forward value stays Ŵ, with Z entering
    straight-through (Ŵ + Z - Z.detach()). `update_indices` moves codes toward Z by the layer's
    `proximal` rule (not stored). `make_stored` rounds floats to fp16, packs codes, drops Z.
    """

    kind = "jlcm"

    def __init__(self, in_features: int, out_features: int, vector_len: int, codebook_size: int,
                 num_groups: int = 1, group_mode: str = "codebook", has_bias: bool = False):
        super().__init__(in_features, out_features, has_bias)
        if group_mode not in GroupMode.values():
            raise ValueError(f"group_mode must be one of {GroupMode.values()}, got {group_mode!r}")
        if vector_len < 1 or codebook_size < 1 or not 1 <= num_groups <= out_features:
            raise ValueError(f"need vector_len >= 1, codebook_size >= 1, 1 <= num_groups <= {out_features}; "
                             f"got {vector_len}, {codebook_size}, {num_groups}")
        self.vector_len, self.codebook_size, self.num_groups = vector_len, codebook_size, num_groups
        self.group_mode = str(group_mode)
        self.nv = math.ceil(in_features / vector_len)
        n_books = num_groups if self.group_mode == "codebook" else 1
        f16, u8 = dict(dtype=torch.float16), dict(dtype=torch.uint8)
        self.register_buffer("codebooks", torch.zeros(n_books, codebook_size, vector_len, **f16))
        self.register_buffer("codes0", torch.zeros(packed_nbytes(out_features * self.nv, self.code_bits), **u8))
        if num_groups > 1:
            self.register_buffer("groups", torch.zeros(packed_nbytes(out_features, self.group_bits), **u8))
        if self.group_mode == "scale":
            self.register_buffer("group_scale", torch.ones(num_groups, **f16))
        if has_bias:
            self.register_buffer("bias", torch.zeros(out_features, **f16))
        self.trainable = False
        self.latent: nn.Parameter | None = None
        self.proximal = ProximalRule()  # how update_indices moves codes; set by the method, not stored
        self._derived: dict[str, Any] | None = None  # unpacked group ids, perm, ... (cache)
        self._codes: torch.Tensor | None = None  # unpacked codes (stored form, cache)

    # -- widths and derived tensors ----------------------------------------------------------------
    @property
    def code_bits(self) -> int:
        return index_bits(self.codebook_size)

    @property
    def group_bits(self) -> int:
        return index_bits(self.num_groups)

    def clear_cache(self) -> None:
        super().clear_cache()
        self._derived = None
        self._codes = None

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda() move the buffers; the caches derived from them are rebuilt.
        out = super()._apply(fn, *args, **kwargs)
        self.clear_cache()
        return out

    def _device(self) -> torch.device:
        return self.codebooks.device

    def derived(self) -> dict[str, Any]:
        """Group ids (original row order), perm (grouped row r is row perm[r]), its inverse,
        the group of each grouped row, and the (start, end) rows of each group in grouped order."""
        if self._derived is None:
            dev = self._device()
            if self.num_groups > 1:
                g = unpack(self._buffers["groups"], self.group_bits, self.out_features).to(dev)
            else:
                g = torch.zeros(self.out_features, dtype=torch.long, device=dev)
            perm = permutation(g)
            counts = torch.bincount(g, minlength=self.num_groups).tolist()
            ends = list(torch.tensor(counts).cumsum(0).tolist())
            self._derived = {"groups": g, "perm": perm, "inv": torch.argsort(perm), "row_group": g[perm],
                             "slices": [(gi, e - c, e) for gi, (c, e) in enumerate(zip(counts, ends))]}
        return self._derived

    def int_codes(self) -> dict[str, torch.Tensor]:
        """{"codes0": (out, nv) int64}, rows in grouped order (the live buffer in trainable mode)."""
        if self.trainable:
            return {"codes0": self._buffers["codes0"]}
        if self._codes is None:
            self._codes = unpack(self._buffers["codes0"], self.code_bits, self.out_features * self.nv).view(
                self.out_features, self.nv).to(self._device())
        return {"codes0": self._codes}

    def float_param(self, name: str) -> torch.Tensor | None:
        if name in self._parameters:
            return self._parameters[name]
        t = self._buffers.get(name)
        return None if t is None else t.float()

    # -- filling the stored form ---------------------------------------------------------------------
    @torch.no_grad()
    def set_state(self, groups: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor,
                  group_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> "JLCMLinear":
        """groups (out,) ids in original row order; codebooks (n_books, K, d); codes (out, nv) in
        grouped row order; group_scale (G,) for group_mode "scale"; bias (out,)."""
        groups = groups.reshape(-1).long()
        if groups.numel() != self.out_features or (groups.numel() and (groups.min() < 0 or groups.max() >= self.num_groups)):
            raise ValueError(f"groups must be {self.out_features} ids in [0, {self.num_groups})")
        if tuple(codes.shape) != (self.out_features, self.nv):
            raise ValueError(f"codes must be {(self.out_features, self.nv)}, got {tuple(codes.shape)}")
        if tuple(codebooks.shape) != tuple(self.codebooks.shape):
            raise ValueError(f"codebooks must be {tuple(self.codebooks.shape)}, got {tuple(codebooks.shape)}")
        if self.num_groups > 1:
            self._buffers["groups"].copy_(pack(groups, self.group_bits))
        self.codebooks.copy_(codebooks.half())
        self._buffers["codes0"].copy_(pack(codes, self.code_bits))
        if self.group_mode == "scale":
            self.group_scale.copy_(group_scale.reshape(-1).half())
        if self.has_bias:
            self.bias.copy_(bias.detach().reshape(-1).half())
        self.clear_cache()
        return self

    # -- reading ------------------------------------------------------------------------------------
    def _grouped_rows(self) -> torch.Tensor:
        """The rows in grouped order, before the group scale: (out, in) fp32."""
        dv = self.derived()
        C = self.float_param("codebooks")
        codes = self.int_codes()["codes0"]
        if self.group_mode == "codebook" and self.num_groups > 1:
            idx = dv["row_group"][:, None] * self.codebook_size + codes
            flat = C.reshape(-1, self.vector_len)
        else:
            idx, flat = codes, C[0]
        return flat[idx].reshape(self.out_features, self.nv * self.vector_len)[:, : self.in_features]

    def dequantize(self) -> torch.Tensor:
        """Ŵ (out, in) in fp32; with a latent in training mode, its straight-through form."""
        rows = self._grouped_rows()
        if self.training and torch.is_grad_enabled() and self.latent is not None and self.latent.requires_grad:
            rows = rows + (self.latent - self.latent.detach())
        scale = self.float_param("group_scale")
        if scale is not None:
            rows = rows * scale[self.derived()["row_group"]][:, None]
        return rows.index_select(0, self.derived()["inv"])

    def bits_breakdown(self) -> dict[str, int]:
        return {k: v.numel() * v.element_size() * 8 for k, v in self.state_dict().items()}

    def meta(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, vector_len=self.vector_len,
                    codebook_size=self.codebook_size, num_groups=self.num_groups, group_mode=self.group_mode,
                    has_bias=self.has_bias)

    # -- trainable mode ------------------------------------------------------------------------------
    def to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight (out, in) in the latent's domain: rows in grouped order, over the group scale."""
        dv = self.derived()
        rows = weight.detach().float().to(self._device())[dv["perm"]]
        scale = self.float_param("group_scale")
        if scale is not None:
            rows = rows / scale.detach()[dv["row_group"]][:, None]
        return rows

    @torch.no_grad()
    def make_trainable(self, latent_weight: torch.Tensor | None = None) -> "JLCMLinear":
        if self.trainable:
            raise RuntimeError("layer is already trainable")
        codes = self.int_codes()["codes0"].clone()
        self.derived()  # the group ids stay packed; their unpacked form is cached
        self._buffers["codes0"] = codes
        self.trainable = True
        for name in ("codebooks", "group_scale", "bias"):
            buf = self._buffers.get(name)
            if buf is None:
                continue
            del self._buffers[name]
            self.register_parameter(name, nn.Parameter(buf.float().clone()))
        if latent_weight is not None:
            if tuple(latent_weight.shape) != (self.out_features, self.in_features):
                raise ValueError(f"weight must be {(self.out_features, self.in_features)}, got {tuple(latent_weight.shape)}")
            self.latent = nn.Parameter(self.to_rows(latent_weight).contiguous())
        self._codes = None
        super().clear_cache()
        return self

    @torch.no_grad()
    def round_to_storage(self) -> None:
        for name, p in self._parameters.items():
            if p is not None and name != "latent":
                p.copy_(p.half().float())

    @torch.no_grad()
    def make_stored(self) -> "JLCMLinear":
        if not self.trainable:
            raise RuntimeError("layer is not in trainable mode")
        self.latent = None
        for name, p in list(self._parameters.items()):
            if p is None:
                continue
            del self._parameters[name]
            self.register_buffer(name, p.detach().half().clone())
        dev = self._device()
        self._buffers["codes0"] = pack(self._buffers["codes0"], self.code_bits).to(dev)
        self.trainable = False
        self.clear_cache()
        return self

    def params_by_role(self) -> dict[str, list[nn.Parameter]]:
        return {"latent": [self.latent] if self.latent is not None else [],
                "codebook": [self._parameters["codebooks"]] if "codebooks" in self._parameters else [],
                "scale": [self._parameters[n] for n in ("group_scale", "bias") if self._parameters.get(n) is not None]}

    @torch.no_grad()
    def reset_latent(self) -> None:
        if self.latent is not None:
            self.latent.copy_(self._grouped_rows())

    @torch.no_grad()
    def update_indices(self, fraction: float = 1.0) -> dict:
        """Move codes toward the latent by the layer's proximal rule (`proximal_codes`), group by
        group against the group's codebook: a code moves only if its new codeword is strictly
        closer to its latent vector; with `fraction` < 1 at most ceil(fraction · n) codes move,
        those that gain most. Padded entries never decide. Returns {"n", "changed"}."""
        if self.latent is None:
            return {"n": 0, "changed": 0}
        d, K, nv = self.vector_len, self.codebook_size, self.nv
        x, mask = to_vectors(self.latent.detach().float(), d)
        codes = self._buffers["codes0"]
        cur = codes.view(-1)
        C = self.float_param("codebooks").detach().float()
        per_group = self.group_mode == "codebook" and self.num_groups > 1
        new = torch.empty_like(cur)
        spans = [(g, s * nv, e * nv) for g, s, e in self.derived()["slices"]] if per_group else [(0, 0, cur.numel())]
        for g, s, e in spans:
            if e > s:
                new[s:e] = proximal_codes(x[s:e], C[g], cur[s:e], self.proximal, None if mask is None else mask[s:e])
        if per_group:
            vec_group = self.derived()["row_group"].repeat_interleave(nv)
            q_cur, q_new = C.reshape(-1, d)[vec_group * K + cur], C.reshape(-1, d)[vec_group * K + new]
        else:
            q_cur, q_new = C[0][cur], C[0][new]
        m = torch.ones_like(x) if mask is None else mask
        gain = (((x - q_cur) ** 2) * m).sum(1) - (((x - q_new) ** 2) * m).sum(1)
        move = (gain > 0) & (new != cur)
        if fraction < 1.0:
            cap = math.ceil(fraction * x.shape[0])
            if int(move.sum()) > cap:
                keep = torch.topk(torch.where(move, gain, torch.full_like(gain, -1.0)), cap).indices
                move = torch.zeros_like(move)
                move[keep] = True
        cur[move] = new[move]
        return {"n": int(cur.numel()), "changed": int(move.sum())}


def stored_mode(layers) -> None:
    for q in layers:
        q.round_to_storage()
        q.make_stored()


# -- the shape bits buy (the shared budget rule applied to JLCM's stored form) ---------------------
@dataclass(frozen=True)
class JLCMShape:
    vector_len: int
    codebook_size: int
    num_groups: int
    group_mode: str
    bpw: float  # of the decoder-block linears, exactly as they will be stored
    over_budget: bool

    @property
    def index_bpw(self) -> float:
        return index_bits(self.codebook_size) / self.vector_len


def stored_bpw(shapes: list[LinearShape], d: int, K: int, G: int, mode: str) -> float:
    """bpw of these linears stored as JLCMLinear (each with min(G, out) groups), every buffer
    counted, from meta-device layers (no memory)."""
    bits = weights = 0
    with torch.device("meta"):
        for (out, inp, bias), count in Counter((s.out_features, s.in_features, s.has_bias) for s in shapes).items():
            q = JLCMLinear(inp, out, d, K, layer_groups(G, out), mode, bias)
            bits += q.stored_bits() * count
            weights += out * inp * count
    return bits / weights


def resolve_shape(bits: int, shapes: list[LinearShape], *, vector_len: int = 1, codebook_size: int = 0,
                  num_groups: int = 0, group_mode: str = "codebook", max_groups: int = 64,
                  max_codebook_size: int = 4096, max_vector_len: int = 12) -> JLCMShape:
    """The shape `bits` buys: methods/vq/budget.py's rule on JLCM's stored form. Candidates are
    d (vector_len, or 1..max_vector_len when 0), K (powers of two up to max_codebook_size) and G
    (powers of two up to max_groups), each with its exact bpw (`stored_bpw`); the rule
    (`budget.select`) keeps those with a nominal index rate ceil(log2 K)/d of at most `bits` and a bpw
    of at most bits + BUDGET_SLACK and takes the highest index rate, then the longest vectors,
    then the most groups (the most specific codebooks, as budget.py's scope order), then the
    lowest bpw. Values set (non-zero) are kept; a shape set entirely by hand is kept even over
    budget. Nothing feasible: the cheapest candidate, marked over budget."""
    if not shapes:
        raise ConfigError("the model has no decoder-block linears to quantize")
    by_hand = bool(vector_len and codebook_size and num_groups)
    ds = [vector_len] if vector_len else list(range(1, max_vector_len + 1))
    Ks = [codebook_size] if codebook_size else [2**k for k in range(1, int(math.log2(max_codebook_size)) + 1)]
    Gs = [num_groups] if num_groups else [2**k for k in range(0, int(math.log2(max_groups)) + 1)]
    cands = []
    for d in ds:
        for K in Ks:
            rate = index_bits(K) / d
            if rate > bits and not by_hand:
                continue
            cands += [(rate, (d, G), stored_bpw(shapes, d, K, G, group_mode), (d, K, G)) for G in Gs]
    picked = select(bits, cands)
    if picked is None:
        raise ConfigError(f"jlcm: no shape has an index rate of at most {bits} bits per weight")
    (d, K, G), bpw, over = picked
    return JLCMShape(d, K, G, str(group_mode), bpw, over)


# -- quantizing one linear ---------------------------------------------------------------------------
@dataclass
class JLCMResult:
    layer: JLCMLinear
    Wq: torch.Tensor  # (out, in) fp32 == layer.dequantize()
    stats: dict = field(default_factory=dict)


def _nearest_rows(x: torch.Tensor, books: torch.Tensor, slices: list[tuple[int, int, int]], nv: int,
                  weights: torch.Tensor | None) -> torch.Tensor:
    """Codes of vectors x (rows·nv, d) laid out row by row (grouped order), each row's vectors
    against its group's codebook (books (n_books, K, d); one book: all rows)."""
    if books.shape[0] == 1:
        return nearest(x, books[0], weights)
    out = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for g, s, e in slices:
        if e > s:
            out[s * nv : e * nv] = nearest(x[s * nv : e * nv], books[g], None if weights is None else weights[s * nv : e * nv])
    return out


def _fit_books(X: torch.Tensor, hd: torch.Tensor, slices, n_books: int, K: int, d: int, cfg: JLCMConfig) -> torch.Tensor:
    """k-means codebooks (n_books, K, d), fp16-exact: per group of rows, or one over all rows."""
    x, mask = to_vectors(X, d)
    w_entry = (hd if cfg.hessian_kmeans else torch.ones_like(hd)).float()
    w_rows = w_entry[None, :].expand(X.shape[0], -1)
    w, _ = to_vectors(w_rows.contiguous(), d)  # padded entries -> weight 0
    w = w if mask is None else w * mask
    nv = math.ceil(X.shape[1] / d)
    groups = slices if n_books > 1 else [(0, 0, X.shape[0])]
    books = torch.zeros(n_books, K, d, device=X.device)
    for g, s, e in groups:
        if e <= s:
            continue  # an empty group: its codebook is never read (still stored and counted)
        xs, ws = x[s * nv : e * nv], w[s * nv : e * nv]
        if float(ws.sum()) <= 0:
            ws = torch.ones_like(ws) if mask is None else mask[s * nv : e * nv]
        r = kmeans(xs, K, ws, iters=cfg.kmeans_iters, tol=cfg.kmeans_tol, init=cfg.kmeans_init, seed=cfg.seed + g)
        books[g] = r.centroids
    return books.half().float()


@torch.no_grad()
def jlcm_quantize(W: torch.Tensor, H: torch.Tensor | None, d: int, K: int, G: int, cfg: JLCMConfig, *,
                  name: str = "", bias: torch.Tensor | None = None) -> JLCMResult:
    """Quantize one linear's weight W (out, in) with input Hessian H (in, in; None: identity,
    and `assign` must be nearest)."""
    m, n = W.shape
    who = f"jlcm {name}"
    if H is None:
        if cfg.assign == "obs":
            raise QuantizationError(f"{who}: assign=obs needs the layer's input Hessian")
        W, H = W.detach().float().clone(), torch.eye(n, dtype=torch.float64, device=W.device)
    else:
        W, H = prepare_hessian(W, H, who)
    G = layer_groups(G, m)
    groups = group_rows(W, G, cfg.group_stat, cfg.seed)
    layer = JLCMLinear(n, m, d, K, G, cfg.group_mode, has_bias=bias is not None).to(W.device)
    perm = permutation(groups)
    counts = torch.bincount(groups, minlength=G).tolist()
    ends = torch.tensor(counts).cumsum(0).tolist()
    slices = [(g, e - c, e) for g, (c, e) in enumerate(zip(counts, ends))]
    row_group = groups[perm]
    Xp = W[perm]
    scale = None
    if cfg.group_mode == "scale":  # one fp16 scale per group: its rows' RMS
        rms = torch.stack([Xp[s:e].pow(2).mean().sqrt() if e > s else Xp.new_tensor(1.0) for _, s, e in slices])
        tiny = torch.finfo(torch.float16).tiny
        scale = torch.where(rms > 0, rms, torch.ones_like(rms)).clamp(tiny, 65504).half().float()
        Xp = Xp / scale[row_group][:, None]
    hd = H.diagonal().float()
    hd = hd / hd.mean().clamp_min(1e-30)
    n_books = G if cfg.group_mode == "codebook" else 1
    books = _fit_books(Xp, hd, slices, n_books, K, d, cfg)
    nv = math.ceil(n / d)
    stats: dict = {"groups": counts}
    if cfg.assign == "nearest":
        x, mask = to_vectors(Xp, d)
        codes = _nearest_rows(x, books, slices, nv, mask).view(m, nv)
    else:
        codes = torch.zeros(m, nv, dtype=torch.long, device=W.device)
        held: dict[str, torch.Tensor] = {}

        def column(c: int, w: torch.Tensor, ahead) -> torch.Tensor:
            j = c % d
            if j == 0:  # the d columns of vector c // d, with every update so far, chosen together
                blk = ahead(min(c + d, n))
                width = blk.shape[1]
                x = torch.zeros(m, d, device=W.device)
                x[:, :width] = blk
                wts = None
                if d > 1:
                    wts = torch.zeros(m, d, device=W.device)
                    wts[:, :width] = hd[c : c + width]
                idx = _nearest_rows(x, books, slices, 1, wts)
                codes[:, c // d] = idx
                held["q"] = _lookup(books, row_group, idx)
            return held["q"][:, j]

        obs_quantize(Xp, H, column, percdamp=cfg.percdamp, blocksize=cfg.blocksize, who=who)
    layer.set_state(groups, books if n_books > 1 else books[:1], codes, scale, bias)
    Wq = layer.dequantize()
    if not torch.isfinite(Wq).all():
        raise QuantizationError(f"{who}: result contains NaN/Inf")
    stats["proxy"] = layer_proxy_loss(W, Wq, H)
    return JLCMResult(layer, Wq, stats)


def _rms(t: torch.Tensor | None) -> float:
    """Root mean square of t (1 for None or an all-zero tensor)."""
    if t is None:
        return 1.0
    v = float(t.detach().float().pow(2).mean().sqrt())
    return v if v > 0 and math.isfinite(v) else 1.0


def _lookup(books: torch.Tensor, row_group: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Codewords (m, d) of one vector per row."""
    if books.shape[0] == 1:
        return books[0][idx]
    return books[row_group, idx]


# -- the method ------------------------------------------------------------------------------------
@METHODS.register("jlcm")
class JLCM(Method):
    Config = JLCMConfig
    parallel_layers = True
    layer_state_attrs = ("layer_stats",)

    def __init__(self, cfg: JLCMConfig, bits: int):
        super().__init__(cfg, bits)
        check_ranges(cfg, self.name, vector_len=">= 0", num_groups=">= 0", max_groups=">= 1", max_vector_len=">= 1",
                     kmeans_iters=">= 1", percdamp=">= 0", blocksize=">= 1", epochs=">= 0", batch_size=">= 1",
                     update_period=">= 1", update_fraction="in (0, 1]", proximal_k=">= 0", proximal_lambda="> 0",
                     val_fraction="in [0, 1)", min_lr_ratio=">= 0")
        if cfg.codebook_size == 1 or cfg.codebook_size < 0:
            raise ConfigError(f"{self.name}: method.codebook_size={cfg.codebook_size} must be 0 (from the budget) or >= 2")
        if cfg.max_codebook_size < 2:
            raise ConfigError(f"{self.name}: method.max_codebook_size={cfg.max_codebook_size} must be >= 2")
        self.needs_hessian = cfg.assign == "obs" or cfg.hessian_kmeans
        self.shape: JLCMShape | None = None  # resolved in prepare() from the budget and the model
        self.layer_stats: dict[str, dict] = {}
        self.blocks: dict[int, dict] = {}

    @property
    def true_sequential(self) -> bool:
        return self.cfg.true_sequential

    @property
    def needs_block_targets(self) -> bool:
        return self._trains() and self.cfg.block_targets == "block"

    def teacher_request(self) -> TeacherRequest | None:
        if self._trains() and self.cfg.block_targets == "model":
            return TeacherRequest(trajectory=True, seed=self.cfg.seed)
        return None

    def _trains(self) -> bool:
        return self.cfg.finetune and self.cfg.epochs > 0

    def prepare(self, model: nn.Module, inputs, teacher) -> None:
        c = self.cfg
        self.shape = resolve_shape(self.bits, model_shapes(model), vector_len=c.vector_len,
                                   codebook_size=c.codebook_size, num_groups=c.num_groups, group_mode=c.group_mode,
                                   max_groups=c.max_groups, max_codebook_size=c.max_codebook_size,
                                   max_vector_len=c.max_vector_len)
        s = self.shape
        log.info("jlcm: bits=%d -> d=%d K=%d G=%d (%s): %.4f bpw%s", self.bits, s.vector_len, s.codebook_size,
                 s.num_groups, s.group_mode, s.bpw, " (over budget)" if s.over_budget else "")

    def quantize_layer(self, name: str, layer: nn.Linear, H: torch.Tensor | None) -> nn.Module:
        if self.shape is None:
            raise QuantizationError(f"jlcm {name}: shape not resolved (prepare not run?)")
        s = self.shape
        r = jlcm_quantize(layer.weight.data, H if self.needs_hessian else None, s.vector_len, s.codebook_size,
                          s.num_groups, self.cfg, name=name, bias=layer.bias)
        self.layer_stats[name] = r.stats
        return r.layer.to(layer.weight.device)

    def finetune_block(self, ctx: BlockContext) -> None:
        """Joint learning of the block's codebooks (scales, biases) and mappings against the FP
        outputs: latents start at the FP weights; every `update_period` steps the codes move by
        the proximal rule (vq/index_updates.IndexUpdates drives the layers' update_indices)."""
        if not self._trains():
            return
        cfg, b = self.cfg, ctx.index
        layers = modules_of(ctx.block, JLCMLinear)
        rule = ProximalRule(str(cfg.proximal), cfg.proximal_k, cfg.proximal_lambda)
        for n, q in layers.items():
            q.make_trainable(ctx.fp_weights[n])
            q.proximal = rule
        groups = []
        for q in layers.values():
            r = q.params_by_role()
            # relative_lr: Adam moves a parameter by about lr per step whatever its gradient, so
            # each layer's rates are scaled by the RMS of what they move (the latent's domain for
            # latents and codebooks, the scales themselves for group scales).
            s_w = _rms(q.latent) if cfg.relative_lr else 1.0
            s_g = _rms(q.float_param("group_scale")) if cfg.relative_lr else 1.0
            groups += [{"params": r["latent"], "lr": cfg.lr_latent * s_w},
                       {"params": r["codebook"], "lr": cfg.lr_codebook * s_w},
                       {"params": [p for p in r["scale"] if p is q.float_param("group_scale")], "lr": cfg.lr_scale * s_g},
                       {"params": [p for p in r["scale"] if p is not q.float_param("group_scale")], "lr": cfg.lr_scale * s_w}]
        if cfg.train_norms:
            groups.append({"params": norm_params(ctx.block), "lr": cfg.lr_norm})
        targets = ctx.targets if cfg.block_targets == "block" else ctx.teacher.hidden(b + 1)
        idx = IndexUpdates(layers.values(), cfg.update_period, cfg.update_fraction)
        tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, val_fraction=cfg.val_fraction,
                         min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, keep_best=True, seed=cfg.seed)
        try:
            res = distill_block(ctx.block, ctx.inputs.hidden, targets, ctx.inputs.kwargs_by_bs, groups, tc,
                                on_step=idx.hook, desc=f"jlcm block {b}")
        finally:
            stored_mode(layers.values())
        summary = idx.summary()
        errs = [q.rel_err(ctx.fp_weights[n]) for n, q in layers.items()]
        self.blocks[b] = {"mse_before": res["train_before"], "mse_after": res["train_after"],
                          "val_mse_before": res["val_before"], "val_mse_after": res["val_after"],
                          **{k: res[k] for k in ("best_epoch", "steps", "seconds", "n_params", "history")},
                          **summary, "rel_err_mean": sum(errs) / len(errs) if errs else None}
        log.info("jlcm block %d: mse %.4g -> %.4g (val %.4g -> %.4g), %.1f%% of codes moved, %.1fs", b,
                 res["train_before"], res["train_after"], res["val_before"], res["val_after"],
                 100 * summary["final_index_change"], res["seconds"])

    def report(self) -> dict:
        s = self.shape
        shape = {} if s is None else {**dataclasses.asdict(s), "index_bpw": s.index_bpw, "bits": self.bits}
        return {"shape": shape, "proximal": {"rule": str(self.cfg.proximal), "k": self.cfg.proximal_k,
                                             "lambda": self.cfg.proximal_lambda},
                "proxy_loss": {n: st["proxy"] for n, st in self.layer_stats.items()},
                "group_sizes": {n: st["groups"] for n, st in self.layer_stats.items()},
                "blocks": self.blocks}
