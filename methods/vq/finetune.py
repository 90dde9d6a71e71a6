"""Block-wise fine-tuning of VQ layers: centroids and norms, codes fixed.

VPTQ (arXiv 2409.17066, §4 and Tab. 8/9) fine-tunes "centroids and layer normalization" of
each decoder layer on 128 calibration samples for 100 iterations (lr 1e-4 for 7B/13B) before
the end-to-end stage; the released code has no fine-tuning at all. We read "layer" as the
decoder layer (the RMSNorm weights live there): the loss is the MSE between the quantized
block's outputs and the full-precision block's outputs on the same inputs (the block loop's
`targets`), as in AQLM/QuIP# block tuning.

Trained: every float buffer of the block's VQ layers that belongs to this block alone
(codebooks, residual/outlier codebooks, norm scales/biases, fp16 outlier lines), and the
block's RMSNorm weights when `tune_rmsnorm`. A codebook shared beyond the block (scope
"model") is frozen: changing it would change blocks already quantized and passed on. A
codebook shared within the block is one trained tensor. Training runs on fp32 stand-ins of
the fp16 buffers; the result is rounded back to fp16. If the tuned block is not better on
the calibration set than before, everything is restored (tuning never makes a block worse).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ttvq_methods.vq.layer import CODEBOOKS, VQLinear

log = logging.getLogger(__name__)

TUNABLE = ("codebook", "res_codebook", "outlier_codebook", "outlier_values", "norm_scale", "norm_bias")


def _norm_params(block: nn.Module) -> list[nn.Parameter]:
    return [p for m in block.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)]


def _mse(block, inputs, targets) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for i, h, kw in inputs.batches():
            y = block(h, **kw)
            y = y[0] if isinstance(y, tuple) else y
            tot += float(((y - targets[i : i + len(h)]) ** 2).sum())
            n += y.numel()
    return tot / max(n, 1)


def finetune_vq_block(block: nn.Module, inputs, targets: torch.Tensor, *, iters: int = 100, lr: float = 1e-4,
                      tune_rmsnorm: bool = True, frozen_scopes: tuple[str, ...] = ("model",)) -> dict:
    vq = [m for m in block.modules() if isinstance(m, VQLinear)]
    leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(buffer) -> (buffer, fp32 leaf)
    for m in vq:
        ft = {}
        for name in TUNABLE:
            buf = m._buffers.get(name)
            if buf is None or (name in CODEBOOKS and m.shared.get(name) in frozen_scopes):
                continue
            if id(buf) not in leaves:
                leaves[id(buf)] = (buf, buf.detach().float().clone().requires_grad_(True))
            ft[name] = leaves[id(buf)][1]
        m.unpacked()  # cache the codes once
        m._ft = ft
        m.train()  # no weight cache: every forward rebuilds W from the stand-ins
    norms = _norm_params(block) if tune_rmsnorm else []
    norm_saved = [p.detach().clone() for p in norms]
    params = [leaf for _, leaf in leaves.values()] + norms
    before = _mse(block, inputs, targets)
    after = before
    try:
        if params and iters > 0:
            for p in norms:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            batches = list(inputs.batches())
            with torch.enable_grad():
                for step in range(iters):
                    i, h, kw = batches[step % len(batches)]
                    y = block(h, **kw)
                    y = y[0] if isinstance(y, tuple) else y
                    loss = ((y - targets[i : i + len(h)]) ** 2).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            after = _mse(block, inputs, targets)
    finally:
        keep = after < before
        with torch.no_grad():
            if keep:
                for buf, leaf in leaves.values():
                    buf.copy_(leaf.detach().half())
            else:
                for p, s in zip(norms, norm_saved):
                    p.copy_(s)
        for m in vq:
            m._ft = None
            m.eval()
            m.clear_cache()
    final = _mse(block, inputs, targets) if keep else before
    log.info("vq block fine-tuning: mse %.4g -> %.4g (%s)", before, final, "kept" if keep else "reverted")
    return {"mse_before": before, "mse_after": final, "kept": keep, "n_params": sum(p.numel() for p in params)}
