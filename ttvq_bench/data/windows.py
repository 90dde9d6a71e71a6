"""Token windows for perplexity and calibration.

Perplexity (GPTQ convention): the split is tokenized once; windows of `seqlen` positions are
cut without overlap (stride = seqlen) or, with stride < seqlen, slide by `stride` and score
only the tokens not scored before. With bos=True every window starts with BOS, which
takes one of the seqlen positions and is never itself predicted.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ttvq_bench.errors import DataError


@dataclass
class Windows:
    input_ids: torch.Tensor  # (n, seqlen) int64
    score_from: torch.Tensor  # (n,) first position whose *target* is scored (targets are ids[1:])
    n_scored: int  # total predicted tokens


def ppl_windows(ids: list[int], seqlen: int, stride: int | None, bos_id: int | None, max_windows: int | None) -> Windows:
    """Cut a tokenized split into evaluation windows."""
    body = seqlen - (1 if bos_id is not None else 0)  # corpus tokens per window
    stride = body if stride is None else min(stride, body)
    if len(ids) < body + (0 if bos_id is not None else 0) or len(ids) < 2:
        raise DataError(f"corpus has {len(ids)} tokens, shorter than one window of {seqlen}")
    rows, starts = [], []
    prev_end = 0  # corpus tokens already scored
    for begin in range(0, len(ids) - body + 1, stride):
        end = begin + body
        chunk = ids[begin:end]
        if bos_id is not None:
            chunk = [bos_id] + chunk
            # Target at position t is chunk[t+1] = ids[begin + t]; score the tokens not yet scored.
            first_new = max(prev_end, begin) - begin
        else:
            # Target at position t is ids[begin + t + 1]; ids[begin] is never predicted here.
            first_new = max(prev_end - 1, begin) - begin if begin else 0
        rows.append(chunk)
        starts.append(first_new)
        prev_end = end
        if max_windows is not None and len(rows) >= max_windows:
            break
    input_ids = torch.tensor(rows, dtype=torch.long)
    score_from = torch.tensor(starts, dtype=torch.long)
    n_scored = int(((seqlen - 1) - score_from).sum())
    return Windows(input_ids, score_from, n_scored)


def calib_windows(ids: list[int], n: int, seqlen: int, bos_id: int | None, seed: int,
                  sampler: str = "documents", stream_start: float = 0.0) -> torch.Tensor:
    """n windows of seqlen tokens (BOS first when bos_id) at seeded random offsets.

    sampler "documents": offsets from a torch generator over the whole calibration split.
    sampler "stream": `random.Random(seed)` and, per window, `randint(start, N - body)` with
    start = floor(stream_start * N), N the stream's length and body the window's tokens after
    BOS: the stories260K reference protocol's calibration windows.
    sampler "gptq": GPTQ's datautils, `randint(0, N - body - 1)` per window from the same seeded
    generator (its `random.seed(seed)`)."""
    body = seqlen - (1 if bos_id is not None else 0)
    prefix = [bos_id] if bos_id is not None else []
    if sampler in ("stream", "gptq"):
        start = math.floor(stream_start * len(ids)) if sampler == "stream" else 0
        last = len(ids) - body - (1 if sampler == "gptq" else 0)
        if last < start:
            raise DataError(f"calibration stream has {len(ids)} tokens: no window of {seqlen} starts after {start}")
        rng = random.Random(seed)
        starts = [rng.randint(start, last) for _ in range(n)]
    else:
        if len(ids) <= body:
            raise DataError(f"calibration split has {len(ids)} tokens, shorter than one window of {seqlen}")
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - body, (n,), generator=g).tolist()
    rows = [prefix + ids[s : s + body] for s in starts]
    return torch.tensor(rows, dtype=torch.long)
