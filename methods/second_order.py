"""Second-order machinery shared by GPTQ, VPTQ and every method that quantizes against the
layer input Hessian: accumulating H, preparing it, the upper Cholesky factor of its damped
inverse, and the OBS column loop with a pluggable column quantizer.

The proxy loss of quantizing a linear layer on calibration inputs X (n rows) is
    ||X Wᵀ - X Wqᵀ||² / n = tr(ΔW H ΔWᵀ)   with   H = XᵀX / n,   ΔW = W - Wq.
H is kept as a running mean in float64, so that summing hundreds of thousands of rank-1 terms
does not lose the small eigenvalues that Cholesky later needs. It is the *uncentred* second
moment (GPTQ and AQLM use it; GPTQ writes 2/n·XᵀX, and the factor 2 changes nothing because
GPTQ is scale invariant and damps relative to mean(diag H)). QuIP# and VPTQ describe a centred
covariance; for a bias-free linear the uncentred one is the output error's Hessian.

The column loop (GPTQ's, Frantar et al. 2023): columns are quantized one at a time in a given
order; each column's error, divided by the diagonal of U (the upper Cholesky factor of H⁻¹),
is spread over the columns not yet quantized, with the updates applied lazily per block of
`blocksize` columns. What "quantize a column" means is the caller's: a uniform grid (GPTQ), the
nearest codeword of each vector of the column (VPTQ).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ttvq_bench.errors import QuantizationError
from ttvq_bench.hashing import hash_obj, hash_tensors
from ttvq_methods.model_walk import BlockInputs, decoder_layers, layer_name, linears, module_device, run_block, to_device

log = logging.getLogger(__name__)

DAMP_RETRIES = 2  # after percdamp fails: try 10x and 100x (0.01 -> 0.1 -> 1.0 of mean diag)
HESSIAN_VERSION = 1  # bump when the Hessian definition changes (it is part of the cache key)


class HessianAccumulator:
    """H = XᵀX / n of the inputs seen so far, or only its diagonal (`diag_only`: O(n) memory,
    what codebooks shared by many layers are fitted on)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None, diag_only: bool = False):
        self.in_features = in_features
        self.diag_only = diag_only
        self.n_samples = 0  # rows (tokens) seen so far
        if diag_only:
            self._sum = torch.zeros(in_features, dtype=torch.float64)
        else:
            self._H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs of shape (..., in_features); every leading index is one sample."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, accumulator expects {self.in_features}")
        if self.diag_only:
            x = x.reshape(-1, self.in_features).double()
            self._sum += (x * x).sum(0).cpu()
            self.n_samples += x.shape[0]
            return
        x = x.reshape(-1, self.in_features).to(device=self._H.device, dtype=torch.float64)
        b = x.shape[0]
        if b == 0:
            return
        n = self.n_samples
        # Running mean: rescale the old mean, add the new batch's share. Keeps H of order
        # |x|² whatever the sample count, so it never overflows or needs a final division.
        self._H.mul_(n / (n + b))
        self._H.addmm_(x.T, x, alpha=1.0 / (n + b))
        self.n_samples = n + b

    def hessian(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.diag_only:
            return (self._sum / max(self.n_samples, 1)).to(dtype)
        if self.n_samples == 0:
            raise RuntimeError("HessianAccumulator.hessian() called before any add_batch")
        return self._H.to(dtype)

    @property
    def H(self) -> torch.Tensor:
        """XᵀX / n in float32 (a copy); use `hessian(torch.float64)` for full precision."""
        return self.hessian(torch.float32)


@torch.no_grad()
def layer_proxy_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) in float64: the mean squared output error of the layer on the inputs of H."""
    d = (W.to(torch.float64) - Wq.to(torch.float64))
    return float(((d @ H.to(device=d.device, dtype=torch.float64)) * d).sum())


@torch.no_grad()
def prepare_hessian(W: torch.Tensor, H: torch.Tensor | None, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W as an fp32 copy, H as an fp64 copy on W's device), both checked finite. Columns that
    no calibration input ever touched (H_jj = 0) cannot matter: their weights become 0 and their
    diagonal 1, so that H is invertible."""
    k = W.shape[1]
    if H is None or tuple(H.shape) != (k, k):
        raise QuantizationError(f"{who}: needs an input Hessian of shape {(k, k)}, got {None if H is None else tuple(H.shape)}")
    W = W.detach().float().clone()
    H = H.detach().to(W.device, torch.float64).clone()
    if not torch.isfinite(W).all() or not torch.isfinite(H).all():
        raise QuantizationError(f"{who}: weight or Hessian contains NaN/Inf")
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def hinv_upper(H: torch.Tensor, percdamp: float, who: str) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)⁻¹, i.e. U with Uᵀ U = (H + damp I)⁻¹, in H's
    dtype (float64 here). damp = percdamp · mean(diag H), retried at 10x and 100x."""
    k = H.shape[0]
    idx = torch.arange(k, device=H.device)
    mean_diag = H.diagonal().mean()
    rels = [percdamp] + [max(percdamp, 1e-3) * 10**a for a in range(1, DAMP_RETRIES + 1)]
    for rel in rels:
        Hd = H.clone()
        Hd[idx, idx] += rel * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U
        log.warning("%s: Cholesky failed with damping %.3g x mean(diag H); retrying with more", who, rel)
    raise QuantizationError(f"{who}: Hessian not positive definite even with damping {rels[-1]:g} x mean(diag)")


# quantize_column(c, w, ahead) -> the quantized column. c is the processing position, w the
# column with every error update so far applied, and ahead(end) the columns [c, end) likewise
# (a grid fitted to a group of columns needs them).
ColumnQuantizer = Callable[[int, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor]


@torch.no_grad()
def obs_quantize(W: torch.Tensor, H: torch.Tensor, quantize_column: ColumnQuantizer, *, percdamp: float,
                 blocksize: int, who: str, order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop over W (m, k) with Hessian H (k, k), columns processed in `order`
    (None: as they are; `quantize_column` gets processing positions). Returns (Q, E) in the
    original column order: the quantized columns and, per column, w - q at the moment it was
    quantized (the error fed forward)."""
    if order is not None:
        W, H = W[:, order], H[order][:, order]
    else:
        W = W.clone()
    U = hinv_upper(H, percdamp, who).float()
    k = W.shape[1]
    Q, E = torch.empty_like(W), torch.empty_like(W)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            w = W1[:, i]

            def ahead(end: int, i: int = i) -> torch.Tensor:
                # Inside the block the columns are in W1; past it, W still lacks the updates
                # from this block's columns so far, which are added here (the lazy update
                # would add them at the block's end).
                inside = W1[:, i : min(end, i2) - i1]
                if end <= i2:
                    return inside
                return torch.cat([inside, W[:, i2:end] - Err1[:, :i] @ U[i1 : i1 + i, i2:end]], dim=1)

            q = quantize_column(c, w, ahead)
            Q[:, c], E[:, c] = q, w - q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= torch.outer(err, U1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if order is not None:
        inv = torch.argsort(order)
        Q, E = Q[:, inv], E[:, inv]
    return Q, E


# -- collecting Hessians on calibration activations ----------------------------------------------
class _Enough(Exception):
    """Raised by the last hook a batch needs: the rest of the block's forward is not computed."""


@torch.no_grad()
def collect_hessians(block: nn.Module, names: list[str], inputs: BlockInputs) -> dict[str, torch.Tensor]:
    """H of the named linears of `block`, from one pass of the block over `inputs`, each batch's
    forward stopped once every named linear has seen it: a true-sequential group's pass (q/k/v
    of a Llama block, say) computes only the block up to its linears."""
    mods = linears(block)
    accs = {n: HessianAccumulator(mods[n].in_features, device=mods[n].weight.device) for n in names}
    seen: set[str] = set()

    def hook(m, a, o, n):
        accs[n].add_batch(a[0])
        seen.add(n)
        if len(seen) == len(accs):
            raise _Enough

    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    dev = module_device(block)
    try:
        for _, h, kw in inputs.batches():
            seen.clear()
            try:
                block(h.to(dev), **to_device(kw, dev))
            except _Enough:
                pass
            if len(seen) != len(accs):
                raise RuntimeError(f"linears {sorted(set(accs) - seen)} did not run in the block's forward")
    finally:
        for h in handles:
            h.remove()
    return {n: a.hessian() for n, a in accs.items()}


@torch.no_grad()
def _accumulate(block: nn.Module, names: list[str], inputs: BlockInputs,
                diag_only: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(H or diag H of the named linears, the block's outputs) from one pass over `inputs`."""
    mods = linears(block)
    accs = {n: HessianAccumulator(mods[n].in_features, device=mods[n].weight.device, diag_only=diag_only)
            for n in names}
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: accs[n].add_batch(a[0])) for n in names]
    try:
        out = run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: a.hessian() for n, a in accs.items()}, out


@torch.no_grad()
def cached_hessians(block: nn.Module, names: list[str], inputs: BlockInputs, cache, inputs_hash: str) -> dict[str, torch.Tensor]:
    """Hessians keyed by what determines them: the block's inputs, the block's current weights
    (earlier groups may already be quantized) and the layer names. Jobs that share these
    (block 0 of every method on one model and calibration set, say) compute them once."""
    if cache is None or not cache.enabled:
        return collect_hessians(block, names, inputs)
    key = hash_obj({"inputs": inputs_hash, "block": hash_tensors(block.state_dict().items()), "names": names,
                    "v": HESSIAN_VERSION})

    def build(tmp):
        save_file({n: h.contiguous() for n, h in collect_hessians(block, names, inputs).items()}, str(tmp / "H.safetensors"))

    path = cache.get_or_create("hessians", key, build) / "H.safetensors"
    return load_file(str(path))


@torch.no_grad()
def fp_hessians(model: nn.Module, inputs: BlockInputs, diag_only: bool = False) -> dict[str, torch.Tensor]:
    """XᵀX/n (or its diagonal) of every decoder-block linear, by full name, from one pass of the
    full-precision blocks over the calibration inputs (`inputs` is left untouched): what VPTQ,
    QuIP# and QTIP quantize against, and what shared codebooks are fitted on."""
    out: dict[str, torch.Tensor] = {}
    cur = inputs
    for b, block in enumerate(decoder_layers(model)):
        hs, hidden = _accumulate(block, list(linears(block)), cur, diag_only=diag_only)
        out.update({layer_name(b, n): h for n, h in hs.items()})
        cur = cur.with_hidden(hidden)
    return out
