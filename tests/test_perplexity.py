"""Perplexity on constructed models whose answer is known, and the window bookkeeping."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ttvq_bench.data.windows import calib_windows, ppl_windows
from ttvq_bench.errors import DataError
from ttvq_bench.evaluate.perplexity import perplexity


class Bigram(nn.Module):
    """logits[t] = table[input[t]]: the probability of each next token depends only on the current one."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def reference_ppl(table, windows):
    """Plain loop: -log p(target | previous) over the scored targets of each window."""
    logp = torch.log_softmax(table.double(), -1)
    total, n = 0.0, 0
    for ids, start in zip(windows.input_ids.tolist(), windows.score_from.tolist()):
        for t in range(start, len(ids) - 1):
            total -= float(logp[ids[t], ids[t + 1]])
            n += 1
    return math.exp(total / n), n


def test_uniform_model_has_ppl_equal_to_vocab():
    V = 37
    ids = torch.randint(0, V, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    w = ppl_windows(ids, seqlen=32, stride=None, bos_id=None, max_windows=None)
    res = perplexity(Bigram(torch.zeros(V, V)), w, batch_size=5, progress=False)
    assert res["ppl"] == pytest.approx(V, rel=1e-6)


@pytest.mark.parametrize("bos,stride", [(None, None), (0, None), (None, 10), (0, 7)])
def test_bigram_matches_reference_loop(bos, stride):
    V = 11
    g = torch.Generator().manual_seed(1)
    table = torch.randn(V, V, generator=g) * 2
    ids = torch.randint(1, V, (500,), generator=g).tolist()
    w = ppl_windows(ids, seqlen=24, stride=stride, bos_id=bos, max_windows=None)
    res = perplexity(Bigram(table), w, batch_size=4, progress=False)
    ref, n = reference_ppl(table, w)
    assert res["n_tokens"] == n
    assert res["ppl"] == pytest.approx(ref, rel=1e-6)


def test_non_overlapping_windows_score_every_token_once():
    ids = list(range(2, 102))  # 100 tokens
    w = ppl_windows(ids, seqlen=10, stride=None, bos_id=1, max_windows=None)
    # BOS + 9 corpus tokens per window; every corpus token predicted exactly once (11 windows = 99 tokens).
    assert w.input_ids.shape == (11, 10)
    assert (w.input_ids[:, 0] == 1).all()
    assert w.n_scored == 99
    assert w.input_ids[1, 1].item() == ids[9]
    # Without BOS the GPTQ convention loses each window's first token: seqlen-1 targets per window.
    w2 = ppl_windows(ids, seqlen=10, stride=None, bos_id=None, max_windows=None)
    assert w2.input_ids.shape == (10, 10) and w2.n_scored == 90


def test_sliding_windows_score_each_token_once():
    ids = list(range(100))
    w = ppl_windows(ids, seqlen=20, stride=5, bos_id=None, max_windows=None)
    scored = []
    for row, s in zip(w.input_ids.tolist(), w.score_from.tolist()):
        scored += row[s + 1 :]
    assert len(scored) == len(set(scored)) == w.n_scored == 99


def test_max_windows_and_short_corpus():
    ids = list(range(1000))
    assert len(ppl_windows(ids, 16, None, None, max_windows=3).input_ids) == 3
    with pytest.raises(DataError, match="shorter than one window"):
        ppl_windows(list(range(10)), 16, None, None, None)
    with pytest.raises(DataError, match="shorter than one window"):
        calib_windows(list(range(10)), 4, 16, 1, seed=0)


def test_calib_windows_are_seeded():
    ids = list(range(5000))
    a = calib_windows(ids, 8, 32, 1, seed=3)
    b = calib_windows(ids, 8, 32, 1, seed=3)
    c = calib_windows(ids, 8, 32, 1, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 32) and (a[:, 0] == 1).all()
    # Each window is a contiguous slice of the corpus.
    assert ((a[:, 2:] - a[:, 1:-1]) == 1).all()
