"""Beam search over M additive codebooks: AQLM's encoder (Egiazarian et al. 2024, `src/
beam_search_xtx.py` and `src/beam_search_l2.py` of Vahe1994/AQLM), shared by every method
whose layers are sums of codewords.

Two objectives:
  * `beam_search_xtx(target, H, books, codes)`: the codes of whole lines (output rows, vectors
    of g consecutive inputs) minimising the layer's proxy loss per row,
        (t_r - u_r)ᵀ H (t_r - u_r),   u_r = Σ_m C_m[c_{r,j,m}] over the row's groups j,
    with the full H = XᵀX/n, so groups compensate each other (OBC/GPTQ-style). Rows are
    independent (a per-row scale only multiplies a row's objective), so every row keeps its
    own beam, all rows at once. Outer loop over input groups, inner loop over codebooks, each
    step replacing one code of one group in every hypothesis by each of the K candidates
    (the reference's order: groups outside, codebooks inside), groups and codebooks in a
    seeded random order per pass (the reference shuffles them with an unseeded RNG).
  * `beam_search_l2(x, books, codes)`: vectors independent, plain (masked) squared distance:
    re-encoding from a latent (PV-tuning's V step, TTVQ's index updates on additive layers).

Both start from the current codes, and every step's candidates include the code a hypothesis
already has, so the best hypothesis never gets worse; `beam_search_xtx` also recomputes every
row's objective exactly at the end and keeps a row's old codes if rounding in the incremental
update ever made it worse, so a pass never increases the objective. With M = 1 the l2 search
is nearest-codeword assignment, and so is the XᵀX search under H = I.

The incremental update. With residual R = t - u and G = R H (one row per hypothesis), changing
one group's code from c_old to c (Δ = c_old - c on the group's slice S) gives
    loss' = loss + 2 c_oldᵀ G_S + c_oldᵀ H_SS c_old - 2 cᵀ (G_S + H_SS c_old) + cᵀ H_SS c,
so a step costs K·g² for the candidates plus B·m·K·g for the scores. G itself is updated
lazily, as GPTQ's lazy batches do: a group's slice of G is brought up to date from the changes
Δ pending since the last flush (B·m·P·g² for P pending groups), and every `flush_cols` columns
one GEMM adds Δ_pending · H[pending rows] to all of G. Updating all of G at every step instead
(a rank-g update, B·m·g·n memory-bound work per step) made one 4096 x 4096 pass take ~200 s on
one CPU thread.
"""
from __future__ import annotations

import math

import torch

# Score matrices (vectors x beam x K) are computed at most this many entries at a time.
CHUNK_ELEMS = 1 << 22


def _decode_lines(books: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """codes (m, nv, M) -> the lines they encode, padded: (m, nv·g)."""
    m, nv, _ = codes.shape
    u = books[0][codes[..., 0]]
    for k in range(1, len(books)):
        u = u + books[k][codes[..., k]]
    return u.reshape(m, nv * books[0].shape[1])


def row_losses(target: torch.Tensor, H: torch.Tensor, books: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """Each row's (t_r - u_r)ᵀ H (t_r - u_r) in float64 (target (m, n), codes (m, nv, M))."""
    n = target.shape[1]
    R = (target.double() - _decode_lines([b.double() for b in books], codes)[:, :n])
    return ((R @ H.double()) * R).sum(1)


@torch.no_grad()
def beam_search_xtx(target: torch.Tensor, H: torch.Tensor, books: list[torch.Tensor], codes: torch.Tensor, *,
                    beam_size: int = 1, seed: int | None = 0, flush_cols: int = 256) -> tuple[torch.Tensor, dict]:
    """New codes (m, nv, M) for the lines `target` (m, n) under the Hessian H (n, n), starting
    from `codes` (m, nv, M) with `books` (M tensors (K_m, g)); a line of n not divisible by g
    is zero-padded (the padded entries have no weight). seed None: natural group and codebook
    order. Returns (codes, {"loss_before", "loss_after", "rows_kept"}): losses summed over rows."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    m, n = target.shape
    M, g = len(books), books[0].shape[1]
    nv = codes.shape[1]
    if codes.shape != (m, nv, M) or nv != math.ceil(n / g):
        raise ValueError(f"codes must be {(m, math.ceil(n / g), M)}, got {tuple(codes.shape)}")
    dev = target.device
    dt = torch.float64 if target.dtype == torch.float64 else torch.float32
    n_pad = nv * g
    C = [b.detach().to(dt) for b in books]
    X = torch.zeros(m, n_pad, device=dev, dtype=dt)
    X[:, :n] = target.detach()
    Hp = torch.zeros(n_pad, n_pad, device=dev, dtype=dt)
    Hp[:n, :n] = H.detach()
    codes = codes.detach().long()
    before = row_losses(target, H, books, codes)

    R = X - _decode_lines(C, codes)
    G0 = (R @ Hp)[None]  # (B0, m, n_pad): G = R H as of the last flush
    L = (R * G0[0]).sum(1)[None]  # (B, m)
    beam = codes[None].clone()  # (B, m, nv, M)
    rows = torch.arange(m, device=dev)
    origin = torch.zeros(1, m, dtype=torch.long, device=dev)  # each hypothesis's row of G0
    pend_cols: list[torch.Tensor] = []  # the groups changed since the last flush ...
    D = torch.zeros(1, m, 0, device=dev, dtype=dt)  # ... and each hypothesis's Δ on them
    if seed is None:
        group_order = list(range(nv))
        cb_orders = [list(range(M))] * nv
    else:
        gen = torch.Generator().manual_seed(seed)
        group_order = torch.randperm(nv, generator=gen).tolist()
        cb_orders = [torch.randperm(M, generator=gen).tolist() for _ in range(nv)]
    flush_every = max(1, flush_cols // g)
    for step, (j, cb_order) in enumerate(zip(group_order, cb_orders)):
        S = slice(j * g, (j + 1) * g)
        Hss = Hp[S, S]
        GS = G0[:, :, S][origin, rows]  # (B, m, g): this group's slice of G, brought up to date
        if pend_cols:
            GS = GS + D @ Hp[torch.cat(pend_cols), S]
        Dj = torch.zeros_like(GS)
        for k in cb_order:
            Ck = C[k]
            K = Ck.shape[0]
            old = Ck[beam[:, :, j, k]]  # (B, m, g)
            oldH = old @ Hss
            a = GS + oldH
            const = L + 2 * (old * GS).sum(-1) + (oldH * old).sum(-1)  # (B, m)
            q = ((Ck @ Hss) * Ck).sum(-1)  # (K,)
            scores = const[..., None] - 2 * (a @ Ck.T) + q  # (B, m, K)
            B = scores.shape[0]
            flat = scores.permute(1, 0, 2).reshape(m, B * K)
            if beam_size == 1:
                vals, idx = flat.min(1, keepdim=True)
            else:
                vals, idx = flat.topk(min(beam_size, B * K), dim=1, largest=False, sorted=True)
            src, new = (idx // K).T, (idx % K).T  # (B', m)
            if B > 1 or src.shape[0] > 1:  # hypotheses reordered per row (one: src is all zeros)
                beam, origin, D, GS, Dj, old = (t[src, rows] for t in (beam, origin, D, GS, Dj, old))
            beam[:, :, j, k] = new
            delta = old - Ck[new]  # (B', m, g)
            GS = GS + delta @ Hss
            Dj = Dj + delta
            L = vals.T.contiguous()
        pend_cols.append(torch.arange(j * g, (j + 1) * g, device=dev))
        D = torch.cat([D, Dj], -1)
        if len(pend_cols) == flush_every and step < nv - 1:
            # bring G = R H up to date for every hypothesis with one GEMM over the pending
            # groups' rows of H, instead of a rank-g update of all of G at every step
            rows_h = Hp[torch.cat(pend_cols)]  # (P·g, n_pad)
            if G0.shape[0] == 1 and D.shape[0] == 1:
                G0[0].addmm_(D[0], rows_h)  # one hypothesis: origin is all zeros, update in place
            else:
                G0 = G0[origin, rows] + D @ rows_h
            origin = torch.arange(G0.shape[0], device=dev)[:, None].expand(-1, m).contiguous()
            pend_cols, D = [], D[:, :, :0]
    best = beam[L.argmin(0), rows] if beam.shape[0] > 1 else beam[0]
    after = row_losses(target, H, books, best)
    worse = after > before
    if worse.any():  # rounding in the incremental update: keep those rows' old codes
        best[worse] = codes[worse]
        after = torch.where(worse, before, after)
    return best, {"loss_before": float(before.sum()), "loss_after": float(after.sum()), "rows_kept": int(worse.sum())}


@torch.no_grad()
def beam_search_l2(x: torch.Tensor, books: list[torch.Tensor], codes: list[torch.Tensor], *, beam_size: int = 1,
                   mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """New codes for vectors x (N, d) minimising Σ_i mask_i (x_i - Σ_m C_m[c_m]_i)² each, by beam
    search over the codebooks in order (each step re-chooses codebook m's code given the
    others), starting from `codes` (M tensors (N,)). Books may differ in size. Returns M
    tensors (N,)."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    N, d = x.shape
    M = len(books)
    out = [c.detach().long().clone() for c in codes]
    if N == 0:
        return out
    C = [b.detach().float() for b in books]
    x = x.detach().float()
    w = None if mask is None else mask.float()
    Kmax = max(c.shape[0] for c in C)
    step = max(1, CHUNK_ELEMS // (beam_size * Kmax))
    for s in range(0, N, step):
        xs = x[s : s + step]
        ws = None if w is None else w[s : s + step]
        n = xs.shape[0]
        ar = torch.arange(n, device=x.device)
        beam = torch.stack([c[s : s + step] for c in out], 1)[:, None]  # (n, B, M)
        res = xs[:, None] - sum(C[k][beam[..., k]] for k in range(M))  # (n, B, d)
        for k in range(M):
            Ck = C[k]
            K = Ck.shape[0]
            res = res + Ck[beam[..., k]]  # without codebook k's contribution
            if ws is None:
                scores = (res * res).sum(-1, keepdim=True) - 2 * res @ Ck.T + (Ck * Ck).sum(-1)
            else:
                scores = ((ws[:, None] * res * res).sum(-1, keepdim=True) - 2 * (ws[:, None] * res) @ Ck.T
                          + (ws @ (Ck * Ck).T)[:, None])
            B = scores.shape[1]
            flat = scores.reshape(n, B * K)
            if beam_size == 1:
                _, idx = flat.min(1, keepdim=True)
            else:
                _, idx = flat.topk(min(beam_size, B * K), dim=1, largest=False, sorted=True)
            src, new = idx // K, idx % K  # (n, B')
            beam = beam[ar[:, None], src]
            beam[..., k] = new
            res = res[ar[:, None], src] - Ck[new]
        err = (res * res) if ws is None else ws[:, None] * res * res
        best = beam[ar, err.sum(-1).argmin(1)]  # (n, M)
        for k in range(M):
            out[k][s : s + step] = best[:, k]
    return out


class BeamEncoder:
    """VQLinear's pluggable re-encoder (`VQLinear.encoder`): a latent's vectors -> codes by
    `beam_search_l2` over all M codebooks (instead of the default greedy residual)."""

    def __init__(self, beam_size: int = 1):
        self.beam_size = int(beam_size)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None, books: list[torch.Tensor],
                 codes: list[torch.Tensor]) -> list[torch.Tensor]:
        return beam_search_l2(x, books, codes, beam_size=self.beam_size, mask=mask)

    def __repr__(self) -> str:
        return f"BeamEncoder(beam_size={self.beam_size})"


@torch.no_grad()
def reencode_moved(q, fraction: float, beam_size: int = 1) -> dict:
    """PV-tuning's V step on a VQLinear in trainable mode with a latent: the ceil(fraction · N)
    vectors whose latent lies farthest from their quantized value (‖z - Σ C[c]‖², padding
    masked) are re-encoded from the latent by `beam_search_l2`; the others keep their codes,
    so at most that many vectors change. Returns {"n", "selected", "changed"}."""
    if q.latent is None:
        return {"n": 0, "selected": 0, "changed": 0}
    from ttvq_methods.vq.layer import to_vectors

    d = q.vector_len
    x, mask = to_vectors(q.latent.detach().float(), d)
    u = q.int_codes()
    cur = [u[f"codes{m}"].view(-1) for m in range(q.M)]
    books = [q.float_param(f"codebook{m}").detach().float() for m in range(q.M)]
    qv = sum(books[m][cur[m]] for m in range(q.M))
    w = torch.ones_like(x) if mask is None else mask
    dist = (((x - qv) ** 2) * w).sum(1)
    N = x.shape[0]
    cap = min(N, math.ceil(fraction * N))
    sel = torch.topk(dist, cap).indices if cap < N else torch.arange(N, device=x.device)
    new = beam_search_l2(x[sel], books, [c[sel] for c in cur], beam_size=beam_size,
                         mask=None if mask is None else mask[sel])
    qn = sum(books[m][new[m]] for m in range(q.M))
    better = (((x[sel] - qn) ** 2) * w[sel]).sum(1) < dist[sel]
    changed = better & torch.stack([new[m] != cur[m][sel] for m in range(q.M)]).any(0)
    for m in range(q.M):
        cur[m][sel[changed]] = new[m][changed]
    return {"n": N, "selected": int(sel.numel()), "changed": int(changed.sum())}
