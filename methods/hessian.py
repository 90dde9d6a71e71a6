"""Layer input Hessians for second-order methods (GPTQ, AQLM, QuIP#, VPTQ, ...).

The proxy loss of quantizing a linear layer on calibration inputs X (n rows) is
    ||X Wᵀ - X Wqᵀ||² / n = tr(ΔW H ΔWᵀ)   with   H = XᵀX / n,   ΔW = W - Wq.
`HessianAccumulator` keeps that H as a running mean, in float64 so that summing hundreds of
thousands of rank-1 terms does not lose the small eigenvalues that Cholesky later needs.

Convention: H here is the *uncentred* second moment XᵀX/n (GPTQ and AQLM use this; GPTQ writes
2/n·XᵀX, and the factor 2 changes nothing because GPTQ is scale invariant and damps relative to
mean(diag H)). QuIP# and VPTQ describe a *centred* covariance; a method that wants it can
subtract the outer product of the input mean, which it must then track itself.
"""
from __future__ import annotations

import torch


class HessianAccumulator:
    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self._H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n_samples = 0  # rows (tokens) seen so far

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs of shape (..., in_features); every leading index is one sample."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, accumulator expects {self.in_features}")
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
