"""AQLM-style additive quantization: the beam search never increases the layer objective and
is nearest-codeword assignment for M = 1 under H = I; calibration lowers the proxy loss and is
deterministic; the additive layer round-trips through the checkpoint exactly and its bpw is
the hand-counted one; PV-tuning's code updates change at most the allowed fraction of groups;
the method end to end on the tiny model (block FT, PV-tuning, resume, reload) and TTVQ with
init=aqlm."""
import copy
import math

import pytest
import torch
from torch import nn

from ttvq_bench.errors import ConfigError
from ttvq_methods.aqlm import AQLM, AQLMConfig, aqlm_quantize, spec_of
from ttvq_methods.checkpoint import load_module_state, save_module_state
from ttvq_methods.second_order import layer_proxy_loss
from ttvq_methods.vq.beam_search import BeamEncoder, beam_search_l2, beam_search_xtx, reencode_moved, row_losses
from ttvq_methods.vq.kmeans import nearest
from ttvq_methods.vq.layer import VQLinear, to_vectors

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(m=12, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    X = torch.randn(64, n, generator=g) @ (torch.eye(n) + 0.4 * torch.randn(n, n, generator=g))
    return W, X.T @ X / 64, g


@pytest.mark.parametrize("M,beam", [(1, 1), (1, 3), (2, 1), (3, 4)])
def test_beam_search_never_increases_the_layer_objective(M, beam):
    W, H, g = problem()
    gs, K = 4, 8  # n = 10: the last group of each row is padded
    books = [torch.randn(K, gs, generator=g) * 0.6 for _ in range(M)]
    codes = torch.randint(0, K, (W.shape[0], 3, M), generator=g)
    loss = start = row_losses(W, H, books, codes)
    for rnd in range(3):  # passes from the previous pass's codes, random group/codebook order
        codes, info = beam_search_xtx(W, H, books, codes, beam_size=beam, seed=rnd)
        new = row_losses(W, H, books, codes)
        assert (new <= loss + 1e-12).all() and info["loss_after"] <= info["loss_before"] + 1e-9
        # the search itself, not the final guard (keep a row's old codes), keeps it monotone
        assert info["rows_kept"] == 0
        loss = new
        if rnd == 0:  # and it searches: one pass from random codes more than halves the objective
            assert float(loss.sum()) < 0.5 * float(start.sum())
    assert float(loss.sum()) < 0.9 * float(row_losses(W, H, books, torch.zeros_like(codes)).sum())
    # the latent re-encoder (plain distance, padding masked) never increases it either
    x, mask = to_vectors(W, gs)
    cur = [torch.randint(0, K, (x.shape[0],), generator=g) for _ in range(M)]
    new = beam_search_l2(x, books, cur, beam_size=beam, mask=mask)

    def dist(cs):
        return (((x - sum(b[c] for b, c in zip(books, cs))) ** 2) * mask).sum(1)

    assert (dist(new) <= dist(cur) + 1e-6).all()


def _exact_beam(target, H, books, codes, beam_size, seed):
    """The search by definition, row by row: every candidate's objective recomputed from scratch."""
    m, nv, M = codes.shape
    K = books[0].shape[0]
    gen = torch.Generator().manual_seed(seed)
    group_order = torch.randperm(nv, generator=gen).tolist()
    cb_orders = [torch.randperm(M, generator=gen).tolist() for _ in range(nv)]
    out = codes.clone()
    for r in range(m):
        t = target[r : r + 1]
        hyps = [codes[r]]
        for j, cb_order in zip(group_order, cb_orders):
            for k in cb_order:
                cands = []
                for h in hyps:
                    for c in range(K):
                        x = h.clone()
                        x[j, k] = c
                        cands.append((float(row_losses(t, H, books, x[None])[0]), x))
                cands.sort(key=lambda e: e[0])
                hyps = [x for _, x in cands[:beam_size]]
        out[r] = hyps[0]
    return out


@pytest.mark.parametrize("beam", [1, 3])
def test_beam_search_lazy_updates_match_the_search_by_definition(beam):
    # float64 so the only difference could be the algorithm; flush_cols=4 flushes the lazy
    # G update every two groups, mid-pass, with hypotheses reordered in between
    W, H, g = problem(m=5, n=13, seed=3)
    W, H = W.double(), H.double()
    gs, K, M = 2, 5, 2
    books = [torch.randn(K, gs, generator=g).double() * 0.6 for _ in range(M)]
    codes = torch.randint(0, K, (5, 7, M), generator=g)
    ref = _exact_beam(W, H, books, codes, beam, seed=11)
    for flush_cols in (4, 2, 256):
        new, info = beam_search_xtx(W, H, books, codes, beam_size=beam, seed=11, flush_cols=flush_cols)
        assert torch.equal(new, ref) and info["rows_kept"] == 0


def test_m1_without_finetuning_is_nearest_codeword_under_identity():
    W, _, g = problem(m=16, n=12, seed=1)
    books = [torch.randn(32, 3, generator=g)]
    codes = torch.randint(0, 32, (16, 4, 1), generator=g)
    new, _ = beam_search_xtx(W, torch.eye(12), books, codes, beam_size=1, seed=5)
    x, mask = to_vectors(W, 3)
    ref = nearest(x, books[0], mask)
    assert torch.equal(new[..., 0].reshape(-1), ref)
    assert torch.equal(beam_search_l2(x, books, [codes.reshape(-1)], beam_size=2)[0], ref)
    # the whole per-layer path with no calibration steps (steps_per_epoch=0): k-means codebook
    # and every group at its nearest codeword of the row-normalised weight, under H = I
    cfg = AQLMConfig(steps_per_epoch=0, max_epochs=0, kmeans_iters=10)
    r = aqlm_quantize(W, torch.eye(12), spec_of(1, 5, 3), cfg, name="l")
    q = r.layer
    s = q.norm_scale.float()
    x, mask = to_vectors(W / s[:, None], 3)
    assert torch.equal(q.int_codes()["codes0"].reshape(-1), nearest(x, q.codebook0.float(), mask))


def test_calibration_lowers_the_proxy_and_is_deterministic():
    W, H, _ = problem(m=24, n=16, seed=2)
    cfg = AQLMConfig(steps_per_epoch=20, kmeans_iters=20, relative_mse_tolerance=0.01)
    a = aqlm_quantize(W, H, spec_of(2, 3, 4), cfg, name="x")
    b = aqlm_quantize(W, H, spec_of(2, 3, 4), cfg, name="x")
    assert a.stats["proxy"] < a.stats["init"] and a.stats["epochs"] >= 1
    assert all(torch.equal(u, v) for u, v in zip(a.layer.state_dict().values(), b.layer.state_dict().values()))
    assert torch.equal(a.Wq, a.layer.dequantize())
    assert layer_proxy_loss(W, a.Wq, H) / 24 == pytest.approx(a.stats["proxy"], rel=1e-9)


def test_additive_layer_round_trips_and_bpw_by_hand(tmp_path):
    W, H, _ = problem(m=6, n=10, seed=3)
    bias = torch.randn(6)
    r = aqlm_quantize(W, H, spec_of(2, 3, 4), AQLMConfig(steps_per_epoch=5, kmeans_iters=5), name="h", bias=bias)
    q = r.layer
    assert (q.orientation, q.norm, q.M, q.codebook_sizes, q.nv) == ("in", "line", 2, [8, 8], 3)
    # by hand: 6 rows x ceil(10/4) = 18 groups, two 3-bit codes each (packed: ceil(54/8) bytes
    # per codebook); two fp16 codebooks of 8 x 4; one fp16 scale per row; the fp16 bias
    bits = 2 * math.ceil(18 * 3 / 8) * 8 + 2 * 8 * 4 * 16 + 6 * 16 + 6 * 16
    assert q.stored_bits() == bits and q.bpw() == bits / 60
    holder = nn.Module()
    holder.l = q
    save_module_state(holder, tmp_path / "q.safetensors")
    fresh = nn.Module()
    fresh.l = nn.Linear(10, 6)
    load_module_state(fresh, tmp_path / "q.safetensors")
    assert isinstance(fresh.l, VQLinear) and torch.equal(fresh.l.dequantize(), r.Wq)
    for k, v in q.state_dict().items():
        assert torch.equal(fresh.l.state_dict()[k], v) and fresh.l.state_dict()[k].dtype == v.dtype
    x = torch.randn(3, 10)
    assert torch.equal(fresh.l(x), q(x))


def test_pv_code_update_changes_at_most_the_allowed_fraction():
    W, H, g = problem(m=20, n=14, seed=4)
    r = aqlm_quantize(W, H, spec_of(2, 3, 4), AQLMConfig(steps_per_epoch=5, kmeans_iters=5), name="p")
    q = r.layer
    q.encoder = BeamEncoder(3)
    t = copy.deepcopy(q).make_trainable(W + torch.randn(W.shape, generator=g))  # a latent far from Ŵ
    before = torch.stack([t.int_codes()["codes0"], t.int_codes()["codes1"]], -1).clone()
    for frac in (0.05, 0.2):
        res = reencode_moved(t, frac, beam_size=3)
        assert res["n"] == 80 and res["selected"] == math.ceil(frac * 80) and 0 < res["changed"] <= res["selected"]
    after = torch.stack([t.int_codes()["codes0"], t.int_codes()["codes1"]], -1)
    assert int((after != before).any(-1).sum()) <= math.ceil(0.05 * 80) + math.ceil(0.2 * 80)
    # the pluggable encoder: update_indices on an additive layer re-encodes by beam search
    u = copy.deepcopy(q).make_trainable(W)
    assert u.encoder is not None and u.update_indices()["changed"] >= 0


def test_budget_refusals_and_hand_shapes():
    with pytest.raises(ConfigError):
        AQLM(AQLMConfig(max_code_change_per_step=0.0), 2)
    with pytest.raises(ConfigError):
        AQLM(AQLMConfig(beam_size=0), 2)


# -- the method on the tiny model ---------------------------------------------------------------------
FAST = ["method=aqlm", "bits=2", "method.steps_per_epoch=10", "method.kmeans_iters=10", "method.ft_epochs=2",
        "method.ft_batch_size=2", "method.val_fraction=0.25"]


def test_run_job_block_ft_pv_and_reload(tiny_cfg, tmp_path):
    from ttvq_bench.run import run_job

    rec = run_job(tiny_cfg(*FAST, "method.pv_tuning=true", "method.pv_epochs=2", "method.pv_batch_size=2",
                           "method.max_code_change_per_step=0.05", "method.pv_lr=1e-3", "method.pv_code_lr=0.1"), tmp_path / "a")
    assert rec["status"] == "ok" and not rec["over_budget"]
    rep = rec["quantize"]["method_report"]
    shape = rep["shape"]
    assert shape["bpw"] == pytest.approx(rec["bpw"], rel=1e-12) and shape["index_bpw"] <= 2
    assert set(rep["finetune"]) == {0, 1} and all(f["val_after"] <= f["val_before"] for f in rep["finetune"].values())
    pv = rep["pv"]
    assert pv["code_updates"] == pv["steps"] > 0
    assert 0 < pv["max_change_fraction_per_update"] <= pv["allowed_fraction"] <= 0.05 + 1 / 8
    assert pv["val_kl_after"] <= pv["val_kl_before"]
    again = run_job(tiny_cfg(*FAST, "method.pv_tuning=true", "method.pv_epochs=2", "method.pv_batch_size=2",
                             "method.max_code_change_per_step=0.05", "method.pv_lr=1e-3", "method.pv_code_lr=0.1",
                             f"checkpoint={rec['quantize']['checkpoint']}"), tmp_path / "b")
    assert again["bpw"] == rec["bpw"] and again["ppl"] == rec["ppl"]


def test_ttvq_with_aqlm_init_runs_end_to_end(tiny_cfg, tmp_path):
    from ttvq_bench.run import run_job

    rec = run_job(tiny_cfg("method=ttvq", "bits=2", "method.init=aqlm", "+method.init_args.aqlm.steps_per_epoch=10",
                           "+method.init_args.aqlm.kmeans_iters=10", "method.block_epochs=2", "method.peft_epochs=1",
                           "method.block_batch_size=2", "method.peft_batch_size=2", "method.update_period=1",
                           "method.val_fraction=0.25", "method.lr_latent=1e-2"), tmp_path / "t")
    assert rec["status"] == "ok"
    rep = rec["quantize"]["method_report"]
    assert rep["init"] == "aqlm" and rep["shape"]["codebook_scope"] == "layer" and rep["shape"]["bpw"] == pytest.approx(rec["bpw"])
    assert all(b["index_updates"] > 0 for b in rep["blocks"].values()) and rep["peft"]["steps"] > 0
    assert math.isfinite(rec["ppl"]["default"])
