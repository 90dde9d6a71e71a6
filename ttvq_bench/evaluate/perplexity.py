"""Perplexity over token windows, batched; never holds full-vocabulary logits for the corpus.
Under torchrun each process scores its share of the windows and the sums are added."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ttvq_bench.data.windows import Windows
from ttvq_bench.distributed import all_sum, shard


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: Windows, batch_size: int = 8, progress: bool = True, desc: str = "ppl") -> dict:
    """Mean NLL over every scored token, and its exp. Logits live one batch at a time."""
    model.eval()
    device = next(model.parameters()).device
    nll_sum, n_tok = 0.0, 0
    ids_all, from_all = windows.input_ids, windows.score_from
    mine = shard(len(ids_all))
    bar = tqdm(range(mine.start, mine.stop, batch_size), desc=desc, disable=not progress, leave=False)
    for i in bar:
        j = min(i + batch_size, mine.stop)
        ids = ids_all[i:j].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)
        pos = torch.arange(targets.size(1), device=device)[None]
        mask = pos >= from_all[i:j, None].to(device)
        nll_sum += float(nll[mask].double().sum())
        n_tok += int(mask.sum())
        bar.set_postfix(ppl=f"{math.exp(nll_sum / max(n_tok, 1)):.3f}")
    nll_sum, n_tok = all_sum(nll_sum, n_tok)
    n_tok = int(n_tok)
    if n_tok != windows.n_scored:  # guards the window bookkeeping
        raise RuntimeError(f"scored {n_tok} tokens, windows promised {windows.n_scored}")
    mean_nll = nll_sum / n_tok
    value = math.exp(mean_nll) if mean_nll < 700 else float("inf")  # NaN stays NaN
    return {"ppl": value, "nll": mean_nll, "n_tokens": n_tok, "n_windows": len(ids_all)}
