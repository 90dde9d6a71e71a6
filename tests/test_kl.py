"""KL(FP ‖ quantized) and top-1 agreement: by hand on fixed logits, exact vs top-k bucket (a
lower bound), and in the record (0 for fp16, larger at fewer bits)."""
import math
from types import SimpleNamespace

import pytest
import torch

from ttvq_bench.data.windows import ppl_windows
from ttvq_bench.evaluate.kl import fp_reference, kl_to_reference


class FixedLogits(torch.nn.Module):
    """logits[t] = table[token t]: a 'model' whose distributions we write down."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def test_kl_and_top1_by_hand():
    V = 4
    p_tab, q_tab = torch.randn(V, V, generator=torch.Generator().manual_seed(0)), torch.randn(V, V, generator=torch.Generator().manual_seed(1))
    ids = [0, 1, 2, 3, 1, 0, 2, 2, 3, 1]
    w = ppl_windows(ids, 5, None, None, None)  # two windows of 5 tokens, 4 predictions each
    ref = fp_reference(FixedLogits(p_tab), w, 1, topk=V)
    got = kl_to_reference(FixedLogits(q_tab), w, 1, ref)
    lp, lq = torch.log_softmax(p_tab, -1), torch.log_softmax(q_tab, -1)
    toks = [t for row in w.input_ids.tolist() for t in row[:-1]]
    kl = sum(float((lp[t].exp() * (lp[t] - lq[t])).sum()) for t in toks) / len(toks)
    agree = sum(int(lp[t].argmax() == lq[t].argmax()) for t in toks) / len(toks)
    assert got["n_tokens"] == 8 and got["exact"] and got["kl"] == pytest.approx(kl, rel=1e-6) and got["top1"] == agree
    same = kl_to_reference(FixedLogits(p_tab), w, 1, ref)
    assert same["kl"] == 0.0 and same["top1"] == 1.0


def test_topk_bucket_is_a_lower_bound_that_tightens():
    g = torch.Generator().manual_seed(2)
    V = 64
    p_tab, q_tab = 3 * torch.randn(V, V, generator=g), 3 * torch.randn(V, V, generator=g)
    w = ppl_windows(torch.randint(0, V, (200,), generator=g).tolist(), 20, None, None, None)
    exact = kl_to_reference(FixedLogits(q_tab), w, 4, fp_reference(FixedLogits(p_tab), w, 4, topk=V))["kl"]
    approx = [kl_to_reference(FixedLogits(q_tab), w, 4, fp_reference(FixedLogits(p_tab), w, 4, topk=k))["kl"] for k in (2, 8, 32)]
    assert all(a <= exact + 1e-9 for a in approx) and approx[0] <= approx[1] <= approx[2]
    assert approx[2] > 0.9 * exact


def test_record_has_kl_and_top1(tiny_cfg, tmp_path):
    from ttvq_bench.run import run_job

    fp = run_job(tiny_cfg("method=fp16"), tmp_path / "fp")
    r2 = run_job(tiny_cfg("method=rtn", "bits=2"), tmp_path / "r2")
    r4 = run_job(tiny_cfg("method=rtn", "bits=4"), tmp_path / "r4")
    assert fp["kl"]["default"] == 0.0 and fp["top1"]["default"] == 1.0
    assert r2["kl"]["default"] > r4["kl"]["default"] > 0 and r2["top1"]["default"] <= r4["top1"]["default"] <= 1
    assert r4["protocol"]["default"]["kl"]["exact"] and math.isfinite(r2["kl"]["default"])
