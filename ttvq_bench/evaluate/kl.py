"""How far the quantized model's next-token distributions are from the full-precision model's,
on the perplexity windows: mean KL(FP ‖ quantized) and top-1 agreement per scored token.

Perplexity on small evaluation sets hides differences between close methods; KL to the FP
model does not (it is the metric peer quantization benchmarks plot against bits).

The FP side is computed once per (model, corpus, protocol), before the model is quantized,
and cached: for each scored token the FP log-probabilities of its `topk` most likely tokens
(all of them when the vocabulary is no larger than `topk`: then the KL is exact) and their
indices. With a larger vocabulary the tokens outside the FP top-k are one bucket on both sides,
which gives a lower bound of the full KL (log-sum inequality); the record says which. Logits
are held one batch at a time, never for the whole corpus. Under torchrun the KL is taken by
each process on its share of the windows and summed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ttvq_bench.data.windows import Windows
from ttvq_bench.distributed import all_sum, shard
from ttvq_bench.hashing import hash_obj


def _scored(model, windows: Windows, batch_size: int, windows_range: range | None = None):
    """Per batch: log-softmax of the logits at the scored positions, (tokens, vocab) fp32."""
    device = next(model.parameters()).device
    r = windows_range if windows_range is not None else range(len(windows.input_ids))
    for i in range(r.start, r.stop, batch_size):
        j = min(i + batch_size, r.stop)
        ids = windows.input_ids[i:j].to(device)
        lp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        pos = torch.arange(lp.shape[1], device=device)[None]
        mask = pos >= windows.score_from[i:j, None].to(device)
        yield lp[mask]


@torch.no_grad()
def fp_reference(model, windows: Windows, batch_size: int, topk: int) -> dict:
    """The FP model's top-k log-probabilities at every scored token."""
    model.eval()
    vals, idx = [], []
    for lp in _scored(model, windows, batch_size):
        k = min(topk, lp.shape[-1])
        v, ix = lp.topk(k, dim=-1) if k < lp.shape[-1] else (lp, None)
        vals.append(v.cpu())
        idx.append(None if ix is None else ix.to(torch.int32).cpu())
    return {"vals": torch.cat(vals), "idx": None if idx[0] is None else torch.cat(idx), "exact": idx[0] is None}


def cached_fp_reference(model, windows: Windows, batch_size: int, topk: int, cache, identity: dict) -> dict:
    """`fp_reference`, cached under a key of what decides it (`identity`: model fingerprint,
    text hash, protocol, storage dtype) and topk."""
    key = hash_obj({**identity, "topk": topk, "n": windows.n_scored})

    def build(tmp):
        torch.save(fp_reference(model, windows, batch_size, topk), tmp / "ref.pt")

    return torch.load(cache.get_or_create("kl_reference", key, build) / "ref.pt")


@torch.no_grad()
def kl_to_reference(model, windows: Windows, batch_size: int, ref: dict) -> dict:
    """Mean KL(FP ‖ model) and top-1 agreement over the scored tokens."""
    model.eval()
    mine = shard(len(windows.input_ids))
    seq = windows.input_ids.shape[1] - 1  # predicted positions per window
    kl_sum, agree, n = 0.0, 0, 0
    start = first = int((seq - windows.score_from[: mine.start].clamp(max=seq)).sum())  # scored tokens before my share
    for lq in _scored(model, windows, batch_size, mine):
        m = lq.shape[0]
        lp = ref["vals"][start : start + m].to(lq.device)
        if ref["idx"] is None:  # the whole distribution
            q = lq
            kl = (lp.exp() * (lp - q)).sum(-1)
            top1_fp = lp.argmax(-1)
        else:  # FP top-k exact, the rest one bucket
            ix = ref["idx"][start : start + m].to(lq.device).long()
            q = lq.gather(-1, ix)
            p_rest = (1 - lp.exp().sum(-1)).clamp_min(0)
            q_rest = (1 - q.exp().sum(-1)).clamp_min(1e-30)
            kl = (lp.exp() * (lp - q)).sum(-1) + p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log())
            top1_fp = ix[:, 0]
        kl_sum += float(kl.double().sum())
        agree += int((lq.argmax(-1) == top1_fp).sum())
        n += m
        start += m
    kl_sum, agree, n, end = all_sum(kl_sum, agree, n, start - first)
    agree, n = int(agree), int(n)
    if int(end) != ref["vals"].shape[0]:
        raise RuntimeError(f"scored {int(end)} tokens, the FP reference has {ref['vals'].shape[0]}")
    return {"kl": kl_sum / n, "top1": agree / n, "n_tokens": n, "exact": ref["exact"],
            "topk": None if ref["exact"] else int(ref["vals"].shape[1])}
