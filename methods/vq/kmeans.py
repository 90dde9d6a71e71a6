"""Weighted k-means for VQ codebooks: deterministic, vectorised, chunked.

    kmeans(x (N, d), K, weights=None | (N,) | (N, d), init="kmeanspp" | "random", seed=0)

Weights come in two shapes:
  * (N,): one importance per vector (VPTQ's Hessian-diagonal weighting: a vector lies in one
    input column, so all its entries share H_jj). Distances are plain Euclidean (a per-vector
    weight cannot change which centroid is nearest); the weights enter the centroid means, the
    k-means++ sampling and the inertia.
  * (N, d): one weight per entry, distance Σ_i w_i (x_i - c_i)². Used for padded vectors (the
    padded entries get weight 0, so they never pull a centroid) and for vectors that cross
    input columns with different H_jj (vectors along the input dimension, AQLM-style).

Choices the references leave open:
  * init: "kmeanspp" (k-means++: weighted D² sampling, on a seeded subsample of at most `init_sample`
    vectors so that it stays O(sample · K · d)) or "random" (K distinct vectors drawn
    uniformly, what VPTQ's cuML `KMeans(init="random")` does).
  * stop: relative inertia decrease below `tol`, or `iters` Lloyd steps (VPTQ: 100, 1e-5).
  * empty clusters are re-seeded with the vectors that currently have the largest weighted
    error (deterministic: top-k, ties by index).
  * K >= number of distinct vectors: the vectors themselves are the codebook (lossless); the
    remaining entries repeat them, so every index stays valid.
The labels returned are the nearest centroids of the *returned* centroids (one final
assignment after the last update), so codes and codebook are always consistent.

Everything runs on the device of x, in float32, with a `torch.Generator` seeded by `seed`
(CPU generator, so results do not depend on the device's RNG); argmin ties go to the lowest
index, so the same seed gives the same codebook and labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ttvq_bench.choices import Choice


class KMeansInit(Choice):
    kmeanspp = "kmeanspp"  # k-means++
    random = "random"


# Distance matrices are computed a chunk of rows at a time, whatever N·K is. On a CPU the chunk
# (4 MB in fp32) stays in cache between the distance GEMM and the arg-min, which for d = 6 is
# what the time goes to (docs/scale.md: 2.2x faster than 16 MB chunks); on a GPU bigger chunks
# keep the kernels few (64 rows per launch at K = 65536 would be launch-bound).
CHUNK_ELEMS = 1 << 20
CHUNK_ELEMS_GPU = 1 << 26


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (K, d) float32
    labels: torch.Tensor  # (N,) int64, nearest centroid of each vector
    inertia: float  # Σ weight · squared distance to the assigned centroid
    n_iter: int


def _rows_per_chunk(K: int, device: torch.device) -> int:
    return max(1, (CHUNK_ELEMS if device.type == "cpu" else CHUNK_ELEMS_GPU) // max(K, 1))


@torch.no_grad()
def nearest(x: torch.Tensor, C: torch.Tensor, weights: torch.Tensor | None = None,
            return_dist: bool = False):
    """Index of the nearest centroid of each row of x (N, d) among C (K, d).

    weights None or (N,): Euclidean; (N, d): Σ_i w_i (x_i - c_i)². The returned distances
    (return_dist) are weighted by `weights` in both cases. Chunked over N."""
    x = x.float()
    C = C.float()
    N = x.shape[0]
    per_entry = weights is not None and weights.dim() == 2
    labels = torch.empty(N, dtype=torch.long, device=x.device)
    dist = torch.empty(N, dtype=torch.float32, device=x.device) if return_dist else None
    c_sq = (C * C).sum(1)
    step = _rows_per_chunk(C.shape[0], x.device)
    for s in range(0, N, step):
        xs = x[s : s + step]
        if per_entry:
            ws = weights[s : s + step].float()
            # Σ w c² - 2 Σ (w x) c (+ Σ w x², constant per row): matmuls, no (n, K, d) tensor.
            d2 = torch.addmm(ws @ (C * C).T, ws * xs, C.T, alpha=-2.0)
            x_sq = (ws * xs * xs).sum(1)
        else:
            d2 = torch.addmm(c_sq, xs, C.T, alpha=-2.0)  # ||c||² - 2 x·c (+ ||x||², constant per row)
            x_sq = (xs * xs).sum(1)
        best, idx = d2.min(1)
        labels[s : s + step] = idx
        if return_dist:
            best = (best + x_sq).clamp_min(0)
            if weights is not None and not per_entry:
                best = best * weights[s : s + step].float()
            dist[s : s + step] = best
    return (labels, dist) if return_dist else labels


def _vector_weight(weights: torch.Tensor | None, N: int, device) -> torch.Tensor:
    if weights is None:
        return torch.ones(N, device=device)
    return weights.float().sum(1) if weights.dim() == 2 else weights.float()


@torch.no_grad()
def _init_kmeanspp(x, w_vec, weights, K, g, init_sample) -> torch.Tensor:
    """Indices of K seeds by weighted D² sampling (on a seeded subsample of init_sample rows)."""
    N = x.shape[0]
    rows = torch.arange(N, device=x.device)
    if N > init_sample:
        rows = torch.randperm(N, generator=g)[:init_sample].sort().values.to(x.device)
        x, w_vec = x[rows], w_vec[rows]
        weights = weights[rows] if weights is not None else None
    picks = torch.empty(K, dtype=torch.long)
    p = w_vec.clamp_min(0).double()
    picks[0] = int(torch.multinomial((p if p.sum() > 0 else torch.ones_like(p)).cpu(), 1, generator=g))
    _, d2 = nearest(x, x[picks[:1]], weights, return_dist=True)  # already weighted
    for k in range(1, K):
        p = d2.double().clamp_min(0)
        if p.sum() <= 0:  # every vector already is a centroid: fill with repeats
            picks[k:] = picks[0]
            break
        picks[k] = int(torch.multinomial(p.cpu(), 1, generator=g))
        _, dk = nearest(x, x[picks[k : k + 1]], weights, return_dist=True)
        d2 = torch.minimum(d2, dk)
    return rows[picks.to(x.device)]


@torch.no_grad()
def kmeans(x: torch.Tensor, K: int, weights: torch.Tensor | None = None, *, iters: int = 100,
           tol: float = 1e-5, init: str = "kmeanspp", seed: int = 0, init_sample: int | None = None) -> KMeansResult:
    """Weighted Lloyd k-means of the rows of x (N, d); see the module docstring."""
    if init not in KMeansInit.values():
        raise ValueError(f"k-means init must be one of {KMeansInit.values()}, got {init!r}")
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    x = x.detach().float()
    N, d = x.shape
    if weights is not None:
        weights = weights.detach().float().to(x.device)
        if weights.shape not in ((N,), (N, d)):
            raise ValueError(f"weights must have shape {(N,)} or {(N, d)}, got {tuple(weights.shape)}")
        if (weights < 0).any():
            raise ValueError("k-means weights must be non-negative")
    g = torch.Generator().manual_seed(seed)
    w_vec = _vector_weight(weights, N, x.device)

    uniq = torch.unique(x, dim=0) if N <= 4 * K else None
    if uniq is not None and uniq.shape[0] <= K:  # lossless: every distinct vector is a centroid
        C = torch.cat([uniq, uniq[torch.zeros(K - uniq.shape[0], dtype=torch.long)]]) if uniq.shape[0] < K else uniq
        labels, dist = nearest(x, C, weights, return_dist=True)
        return KMeansResult(C, labels, float(dist.sum()), 0)

    if init == "random":
        pick = torch.randperm(N, generator=g)[:K].to(x.device)
    else:
        pick = _init_kmeanspp(x, w_vec, weights, K, g, init_sample or max(64 * K, 4096))
    C = x[pick].clone()
    if weights is not None and weights.dim() == 2:
        # A sampled vector's weightless entries (padding) carry no information: start them at
        # the data's weighted mean of that entry instead, so no centroid keeps a padding value.
        fill = (weights * x).sum(0) / weights.sum(0).clamp_min(1e-30)
        C = torch.where(weights[pick] > 0, C, fill.expand_as(C))

    prev = float("inf")
    n_iter = 0
    ent = weights if (weights is not None and weights.dim() == 2) else w_vec[:, None].expand(N, d)
    for n_iter in range(1, iters + 1):
        labels, dist = nearest(x, C, weights, return_dist=True)
        inertia = float(dist.sum())
        # Weighted means per cluster and per entry (per-entry weights can differ by coordinate).
        num = torch.zeros(K, d, device=x.device).index_add_(0, labels, ent * x)
        den = torch.zeros(K, d, device=x.device).index_add_(0, labels, ent)
        C = torch.where(den > 0, num / den.clamp_min(1e-30), C)
        empty = torch.bincount(labels, weights=w_vec, minlength=K) <= 0
        if empty.any():
            # Re-seed empty clusters with the worst-served vectors (largest weighted error).
            n_empty = int(empty.sum())
            worst = torch.topk(dist, min(n_empty, N)).indices
            C[empty.nonzero().squeeze(1)[: worst.numel()]] = x[worst]
        if prev - inertia <= tol * max(prev, 1e-30) and prev != float("inf"):
            break
        prev = inertia
    labels, dist = nearest(x, C, weights, return_dist=True)
    return KMeansResult(C, labels, float(dist.sum()), n_iter)
