"""JLCM: grouping and its permutation (a lossless JLCM model computes exactly what the FP model
computes), the stored layer by hand (every bit counted, checkpoint round trip, trainable mode
exact), the proximal mapping rule (never moves a code farther than allowed), the budget rule on
JLCM's stored form, the initial assignment, and the method end to end on the tiny model (joint
learning lowers the held-out block MSE, frozen codes stay, resume, reload and export, the record's bpw)."""
import math

import pytest
import torch
from torch import nn

from ttvq_bench.errors import ConfigError
from ttvq_methods.base import make_config
from ttvq_methods.checkpoint import load_module_state, save_module_state
from ttvq_methods.model_walk import decoder_layers, linears, modules_of, set_module
from ttvq_methods.packing import packed_nbytes
from ttvq_methods.registry import METHODS
from ttvq_methods.second_order import layer_proxy_loss
from ttvq_methods.jlcm import (JLCM, JLCMConfig, JLCMLinear, ProximalRule, group_rows, jlcm_quantize, neighbours,
                               permutation, proximal_codes, resolve_shape)
from ttvq_methods.vq.budget import BUDGET_SLACK, LinearShape

pytestmark = pytest.mark.usefixtures("one_thread")


# -- grouping and the permutation --------------------------------------------------------------------
def test_grouping_puts_similarly_distributed_rows_together():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 3.0, 0.1, 1.0, 3.0, 1.0, 0.1, 3.0, 1.0])  # three kinds of rows, shuffled
    W = torch.randn(9, 64, generator=g) * scales[:, None]
    for stat in ("std", "absmax", "quantiles"):
        ids = group_rows(W, 3, stat)
        assert sorted(torch.bincount(ids, minlength=3).tolist()) == [3, 3, 3], stat
        for s in scales.unique():
            assert ids[scales == s].unique().numel() == 1, (stat, s)  # one kind of row, one group
        assert ids[scales == 0.1][0] == 0 and ids[scales == 3.0][0] == 2  # group 0: the smallest
    # "quantiles" sees the shape of a distribution, not only its scale: same std, other shape
    sign = torch.sign(torch.randn(6, 64, generator=g))  # ±1: std 1, no tails
    gauss = torch.randn(6, 64, generator=g)
    ids = group_rows(torch.cat([sign, gauss])[torch.tensor([0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11])], 2, "quantiles")
    assert ids[0::2].unique().numel() == 1 and ids[1::2].unique().numel() == 1 and ids[0] != ids[1]
    # the permutation makes each group contiguous and keeps the original order inside a group
    ids = torch.tensor([2, 0, 1, 0, 2, 1])
    assert permutation(ids).tolist() == [1, 3, 2, 5, 0, 4]
    assert group_rows(W, 1).unique().tolist() == [0] and group_rows(W, 100).unique().numel() == 9  # G <= rows


def lossless_layer(W: torch.Tensor, G: int, d: int = 1) -> JLCMLinear:
    """W stored exactly (fp16 values): each group's codebook holds every distinct vector of it."""
    out, inp = W.shape
    ids = group_rows(W, G)
    Gl = int(ids.max()) + 1
    Wp = W.half().float()[permutation(ids)]
    rows_g = ids[permutation(ids)]
    from ttvq_methods.vq.layer import to_vectors

    nv = math.ceil(inp / d)
    x, _ = to_vectors(Wp, d)
    uniq = [torch.unique(x[(rows_g == g).repeat_interleave(nv)], dim=0) for g in range(Gl)]
    K = 2 ** max(1, math.ceil(math.log2(max(u.shape[0] for u in uniq))))
    books = torch.zeros(Gl, K, d)
    codes = torch.zeros(out * nv, dtype=torch.long)
    for g, u in enumerate(uniq):
        books[g, : u.shape[0]] = u
        sel = (rows_g == g).repeat_interleave(nv)
        codes[sel] = (x[sel][:, None, :] == u[None]).all(-1).float().argmax(1)
    q = JLCMLinear(inp, out, d, K, Gl)
    return q.set_state(ids, books, codes.view(out, nv))


@pytest.mark.parametrize("d", [1, 3])
def test_grouping_and_permutation_leave_fp_model_outputs_unchanged(tiny_cfg, d):
    from ttvq_bench.models import load_model
    from ttvq_bench.record.cache import Cache

    cfg = tiny_cfg()
    lm = load_model(cfg.model, Cache(cfg.cache_dir), False)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in lm.model.parameters():
            p.copy_(p.half().float())  # what a stored fp16 codebook holds
        ref = lm.model(input_ids=ids).logits
        for b, block in enumerate(decoder_layers(lm.model)):
            for name, lin in linears(block).items():
                q = lossless_layer(lin.weight.data, 4, d)
                assert q.num_groups > 1 and not torch.equal(q.derived()["perm"], torch.arange(lin.out_features))
                assert torch.equal(q.dequantize(), lin.weight.data)
                set_module(block, name, q)
        assert len(modules_of(lm.model, JLCMLinear)) == 14
        assert torch.equal(lm.model(input_ids=ids).logits, ref)
        # ... and without the inverse permutation it would not be (the test can fail)
        q = modules_of(lm.model, JLCMLinear)["model.layers.0.mlp.down_proj"]
        q._derived["inv"] = torch.arange(q.out_features)
        q._w_cache = None
        assert not torch.allclose(lm.model(input_ids=ids).logits, ref)


# -- the stored layer ----------------------------------------------------------------------------------
def hand_layer(mode="codebook", bias=False):
    """out=4, in=3, d=2 (the second vector of each row is padded), K=2, G=2: rows 1, 3 in group 0."""
    q = JLCMLinear(3, 4, vector_len=2, codebook_size=2, num_groups=2, group_mode=mode, has_bias=bias)
    books = torch.tensor([[[1.0, 2.0], [0.0, -1.0]], [[10.0, 20.0], [-5.0, 5.0]]])
    codes = torch.tensor([[0, 1], [1, 1], [1, 0], [0, 0]])  # grouped order: rows 1, 3 | 0, 2
    q.set_state(torch.tensor([1, 0, 1, 0]), books if mode == "codebook" else books[:1], codes,
                torch.tensor([2.0, 0.5]) if mode == "scale" else None, torch.tensor([1.0, 2, 3, 4]) if bias else None)
    return q


def test_stored_layer_by_hand_every_bit_counted(tmp_path):
    q = hand_layer()
    W = torch.tensor([[-5.0, 5.0, 10.0],  # row 0: group 1, grouped row 2: codes (1, 0)
                      [1.0, 2.0, 0.0],  # row 1: group 0, grouped row 0: codes (0, 1)
                      [10.0, 20.0, 10.0],  # row 2: group 1, grouped row 3: codes (0, 0)
                      [0.0, -1.0, 0.0]])  # row 3: group 0, grouped row 1: codes (1, 1)
    assert torch.equal(q.dequantize(), W)
    x = torch.randn(5, 3)
    assert torch.allclose(q(x), x @ W.T)
    # codebooks 2·2·2 fp16, codes 4 rows · 2 vectors · 1 bit -> 1 byte, groups 4 rows · 1 bit -> 1 byte
    assert q.bits_breakdown() == {"codebooks": 8 * 16, "codes0": 8, "groups": 8}
    assert q.stored_bits() == 8 * 16 + 8 + 8
    s = hand_layer("scale", bias=True)
    assert s.bits_breakdown() == {"codebooks": 4 * 16, "codes0": 8, "groups": 8, "group_scale": 2 * 16, "bias": 4 * 16}
    # one codebook [[1, 2], [0, -1]]; group 0 (rows 1, 3) scaled by 2, group 1 (rows 0, 2) by 0.5
    Ws = torch.tensor([[0.0, -0.5, 0.5], [2.0, 4.0, 0.0], [0.5, 1.0, 0.5], [0.0, -2.0, 0.0]])
    assert torch.equal(s.dequantize(), Ws) and torch.allclose(s(x), x @ Ws.T + torch.tensor([1.0, 2, 3, 4]))
    # a checkpoint holds exactly these bytes and rebuilds the same layer
    for layer in (q, s):
        save_module_state(nn.Sequential(layer), tmp_path / "l.safetensors")
        fresh = nn.Sequential(nn.Linear(3, 4, bias=layer.has_bias))
        load_module_state(fresh, tmp_path / "l.safetensors")
        assert isinstance(fresh[0], JLCMLinear) and torch.equal(fresh[0].dequantize(), layer.dequantize())
        assert fresh[0].stored_bits() == layer.stored_bits()
    one = JLCMLinear(3, 4, 1, 4, 1)
    assert set(one.state_dict()) == {"codebooks", "codes0"}  # one group: no permutation to store


def test_trainable_mode_straight_through_and_exact_stored_form(tmp_path):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 10, generator=g) * torch.linspace(0.2, 2, 12)[:, None]
    for mode in ("codebook", "scale"):
        cfg = JLCMConfig(assign="nearest", hessian_kmeans=False, kmeans_iters=10, group_mode=mode)
        q = jlcm_quantize(W, None, 2, 8, 3, cfg).layer
        t = q.make_trainable(W).train()
        # the latent is W in grouped order (over the group scales): its nearest codes are q's
        assert torch.allclose(t.latent, t.to_rows(W))
        x = torch.randn(6, 10, generator=g)
        y = t(x)
        assert torch.allclose(y, x @ q.dequantize().T.detach(), atol=1e-6)  # the forward is Ŵ, not the latent
        y.pow(2).sum().backward()
        assert t.latent.grad is not None and t.codebooks.grad is not None and t.latent.grad.abs().sum() > 0
        opt = torch.optim.Adam([p for p in t.parameters()], lr=5e-2)
        for _ in range(3):
            opt.zero_grad()
            t(x).pow(2).sum().backward()
            opt.step()
            t.update_indices()
        t.round_to_storage()
        t.eval()
        y = t(x)
        stored = t.make_stored()
        assert not stored.trainable and next(stored.parameters(), None) is None
        assert not any("latent" in k for k in stored.state_dict())
        assert torch.equal(stored(x), y)
        save_module_state(nn.Sequential(stored), tmp_path / "t.safetensors")
        fresh = nn.Sequential(nn.Linear(10, 12, bias=False))
        load_module_state(fresh, tmp_path / "t.safetensors")
        assert torch.equal(fresh(x), y)


# -- the proximal rule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 3])
def test_proximal_rule_never_moves_an_index_farther_than_allowed(d):
    g = torch.Generator().manual_seed(d)
    K, N = 16, 4000
    C = torch.randn(K, d, generator=g)
    cur = torch.randint(0, K, (N,), generator=g)
    x = C[cur] + 3 * torch.randn(N, d, generator=g)  # latents far from their codewords
    D = torch.cdist(C, C) ** 2
    for k in (1, 2, 5):
        new = proximal_codes(x, C, cur, ProximalRule("knn", k))
        allowed = torch.cat([cur[:, None], neighbours(C, k)[cur]], 1)
        assert (allowed == new[:, None]).any(1).all()
        # no farther than the k-th nearest other codeword
        kth = torch.sort(D + torch.eye(K) * 1e9, 1).values[:, k - 1]
        assert (D[cur, new] <= kth[cur] + 1e-6).all()
        assert (new != cur).any()
    for lam in (0.5, 1.0, 4.0):
        new = proximal_codes(x, C, cur, ProximalRule("penalty", lam=lam))
        move2 = ((C[new] - C[cur]) ** 2).sum(1)
        assert (move2 <= ((x - C[cur]) ** 2).sum(1) / lam + 1e-5).all()
        assert (new != cur).any()
    # the unrestricted rule does jump farther (the bounds above are not vacuous)
    free = proximal_codes(x, C, cur, ProximalRule("none"))
    assert (D[cur, free] > torch.sort(D + torch.eye(K) * 1e9, 1).values[cur, 0] + 1e-6).any()
    assert torch.equal(proximal_codes(x, C, cur, ProximalRule("knn", 0)), cur)
    assert torch.equal(proximal_codes(x, C, cur, ProximalRule("knn", K - 1)), free)


def test_layer_update_moves_codes_within_the_rule_per_group_and_padding():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 5, generator=g) * torch.linspace(0.5, 4, 8)[:, None]
    cfg = JLCMConfig(assign="nearest", hessian_kmeans=False, kmeans_iters=10)
    q = jlcm_quantize(W, None, 2, 16, 2, cfg).layer  # in=5, d=2: last vector padded
    before = q.int_codes()["codes0"].clone()
    books = q.codebooks.float()
    t = q.make_trainable(W + 5 * torch.randn(8, 5, generator=g))
    t.proximal = ProximalRule("knn", 1)
    r = t.update_indices()
    after = t.int_codes()["codes0"]
    assert r["n"] == 8 * 3 and 0 < r["changed"] <= r["n"]
    rg = t.derived()["row_group"]
    for row in range(8):
        nb = neighbours(books[rg[row]], 1)
        for v in range(3):
            a, b = int(before[row, v]), int(after[row, v])
            assert a == b or b == int(nb[a, 0])
    # only improving moves; a capped fraction moves at most ceil(fraction · n) codes
    t2 = jlcm_quantize(W, None, 2, 16, 2, cfg).layer.make_trainable(W + 5 * torch.randn(8, 5, generator=g))
    t2.proximal = ProximalRule("none")
    assert t2.update_indices(fraction=0.1)["changed"] <= math.ceil(0.1 * 24)
    t2.update_indices()
    assert t2.update_indices()["changed"] == 0  # nothing left to gain
    # padded entries never decide: a latent that differs only in the padding moves nothing
    t3 = jlcm_quantize(W, None, 2, 16, 2, cfg).layer.make_trainable(None)
    t3.latent = nn.Parameter(t3._grouped_rows().detach().clone())
    assert t3.update_indices()["changed"] == 0


# -- initial codebooks and mappings ------------------------------------------------------------------
def correlated(n_in=24, out=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, n_in, generator=g) @ (torch.eye(n_in) + 0.6 * torch.randn(n_in, n_in, generator=g))
    W = torch.randn(out, n_in, generator=g) * torch.logspace(-1, 0.5, out)[torch.randperm(out, generator=g)][:, None]
    return W, X.T @ X / 2048


@pytest.mark.parametrize("d", [1, 2])
def test_obs_assignment_and_groups_lower_the_output_error(d):
    W, H = correlated()
    K = 4 if d == 1 else 16
    base = dict(kmeans_iters=30)
    obs = jlcm_quantize(W, H, d, K, 4, JLCMConfig(**base))
    near = jlcm_quantize(W, H, d, K, 4, JLCMConfig(assign="nearest", **base))
    one = jlcm_quantize(W, H, d, K, 1, JLCMConfig(**base))
    assert torch.equal(obs.layer.dequantize(), obs.Wq) and obs.stats["proxy"] == pytest.approx(layer_proxy_loss(W, obs.Wq, H))
    assert obs.stats["proxy"] < 0.9 * near.stats["proxy"], (obs.stats, near.stats)
    assert obs.stats["proxy"] < 0.9 * one.stats["proxy"], (obs.stats, one.stats)  # a codebook per group helps
    assert obs.stats["groups"] == [8, 8, 8, 8]
    scale = jlcm_quantize(W, H, d, K, 4, JLCMConfig(group_mode="scale", **base))
    assert scale.stats["proxy"] < one.stats["proxy"]
    again = jlcm_quantize(W, H, d, K, 4, JLCMConfig(**base))
    assert all(torch.equal(a, b) for a, b in zip(obs.layer.state_dict().values(), again.layer.state_dict().values()))


# -- the budget --------------------------------------------------------------------------------------------
STORIES = [LinearShape(b, o, i) for b in range(5)
           for o, i in [(64, 64), (32, 64), (32, 64), (64, 64), (172, 64), (172, 64), (64, 172)]]


def test_budget_resolves_within_budget_and_counts_every_bit():
    r = resolve_shape(2, STORIES)  # d = 1, the paper's scalar codebooks
    assert (r.vector_len, r.codebook_size, r.num_groups, r.over_budget) == (1, 4, 16, False)
    rows = [s.out_features for s in STORIES]
    bits = (226560 * 2  # codes: 2 bits per weight
            + 35 * 16 * 4 * 16  # 16 codebooks of 4 fp16 values per linear
            + sum(packed_nbytes(o, 4) * 8 for o in rows))  # 4-bit group id per row: the permutation
    assert r.bpw == pytest.approx(bits / 226560) and r.bpw <= 2 + BUDGET_SLACK
    # one more doubling of the groups would break the budget: the rule spends it, no more
    more = resolve_shape(2, STORIES, codebook_size=4, num_groups=32)  # by hand: kept, marked
    assert more.bpw > 2 + BUDGET_SLACK and more.over_budget
    assert resolve_shape(2, STORIES, num_groups=32).codebook_size == 2  # G fixed: K gives way
    v = resolve_shape(2, STORIES, vector_len=0)  # the longest vectors the budget buys
    assert (v.vector_len, v.codebook_size, v.num_groups) == (2, 16, 4) and v.bpw <= 2 + BUDGET_SLACK
    t = resolve_shape(3, STORIES, vector_len=0)
    assert (t.vector_len, t.codebook_size, t.index_bpw) == (2, 64, 3.0) and not t.over_budget
    hand = resolve_shape(2, STORIES, vector_len=4, codebook_size=256, num_groups=4)  # kept, marked
    assert (hand.vector_len, hand.codebook_size, hand.num_groups) == (4, 256, 4) and hand.over_budget


def test_config_errors_are_one_line():
    cls = METHODS.get("jlcm")
    for bad, key in ((dict(codebook_size=1), "codebook_size"), (dict(num_groups=-1), "num_groups"),
                     (dict(proximal_k=-1), "proximal_k"), (dict(proximal_lambda=0.0), "proximal_lambda"),
                     (dict(update_fraction=0.0), "update_fraction"), (dict(vector_len=-2), "vector_len"),
                     (dict(epochs=-1), "epochs")):
        with pytest.raises(ConfigError, match=key) as e:
            cls(JLCMConfig(**bad), 2)
        assert "\n" not in str(e.value)
    for key, val in (("proximal", "far"), ("group_stat", "median"), ("group_mode", "both")):
        with pytest.raises(ConfigError, match=key):
            make_config(JLCMConfig, {key: val}, "jlcm")


def test_yaml_composes(compose):
    cfg = compose(["method=jlcm", "bits=3", "method.vector_len=2", "method.proximal=penalty"])
    assert cfg.method.name == "jlcm" and cfg.method.vector_len == 2 and cfg.method.proximal == "penalty"
    assert cfg.method.group_mode == "codebook" and cfg.method.proximal_k == 1 and cfg.method.block_targets == "model"


# -- the method on the tiny model ---------------------------------------------------------------------------
FAST = ("method=jlcm", "bits=2", "method.kmeans_iters=10", "method.epochs=3", "method.batch_size=2",
        "method.update_period=1", "method.val_fraction=0.25")


@pytest.fixture
def tiny_jlcm(tiny_cfg):
    from omegaconf import OmegaConf

    from conftest import quantize_recording

    def run(*overrides):
        cfg = tiny_cfg(*FAST, *overrides)
        method = JLCM(OmegaConf.to_object(cfg.method), cfg.bits)
        lm, _, init = quantize_recording(cfg, method)
        return method, init, modules_of(lm.model, JLCMLinear)

    return run


def test_joint_learning_moves_codes_proximally_and_lowers_heldout_mse(tiny_jlcm, monkeypatch):
    real = JLCMLinear.update_indices
    seen = {"updates": 0, "moves": 0}

    def checked(self, fraction=1.0):  # every move, at the moment it is made: to the nearest other codeword
        before, books = self.int_codes()["codes0"].clone(), self.codebooks.detach().clone()
        r = real(self, fraction)
        after, rg = self.int_codes()["codes0"], self.derived()["row_group"]
        for row, v in (before != after).nonzero().tolist():
            assert int(after[row, v]) == int(neighbours(books[rg[row]], 1)[before[row, v], 0])
        seen["updates"] += 1
        seen["moves"] += r["changed"]
        return r

    monkeypatch.setattr(JLCMLinear, "update_indices", checked)
    method, init, final = tiny_jlcm("method.assign=nearest")  # the default rule: knn, k = 1
    rep = method.report()
    assert len(final) == 14 and rep["shape"]["vector_len"] == 1
    assert seen["updates"] > 0 and seen["moves"] > 0
    assert all(r["val_mse_after"] < r["val_mse_before"] and r["index_updates"] > 0 for r in rep["blocks"].values())
    assert any(r["final_index_change"] > 0 for r in rep["blocks"].values())
    for n, q in final.items():
        assert torch.equal(init[n]["groups"], q.state_dict()["groups"])  # the grouping is fixed


def test_frozen_mappings_never_move(tiny_jlcm):
    method, init, final = tiny_jlcm("method.proximal_k=0")
    for n, q in final.items():
        assert torch.equal(q.state_dict()["codes0"], init[n]["codes0"]), n
    assert all(b["final_index_change"] == 0 for b in method.report()["blocks"].values())


def test_end_to_end_bpw_counts_every_bit_resume_and_reload(tiny_cfg, tmp_path, monkeypatch):
    from ttvq_bench.run import run_job
    from ttvq_methods import jlcm

    real = jlcm.JLCM.quantize_layer

    def dies_in_block1(self, name, layer, H):
        if ".layers.1." in name:
            raise KeyboardInterrupt
        return real(self, name, layer, H)

    args = (*FAST, "method.vector_len=2", "method.num_groups=2", "method.block_targets=block")
    monkeypatch.setattr(jlcm.JLCM, "quantize_layer", dies_in_block1)
    with pytest.raises(KeyboardInterrupt):
        run_job(tiny_cfg(*args), tmp_path / "a")
    monkeypatch.setattr(jlcm.JLCM, "quantize_layer", real)
    resumed = run_job(tiny_cfg(*args), tmp_path / "b")
    assert resumed["status"] == "ok" and resumed["quantize"]["resumed_blocks"] == 1
    clean = run_job(tiny_cfg(*args, "cache=false", "force=true"), tmp_path / "c")
    assert resumed["ppl"] == clean["ppl"] and resumed["bpw"] == clean["bpw"]
    shape = clean["quantize"]["method_report"]["shape"]
    d, K, G = shape["vector_len"], shape["codebook_size"], shape["num_groups"]
    assert (d, G) == (2, 2) and clean["bpw"] == pytest.approx(shape["bpw"]) and not clean["over_budget"]
    # the tiny model: hidden 32, 2 heads of 16 with one KV head, MLP 88, 2 blocks
    layers = [(32, 32), (16, 32), (16, 32), (32, 32), (88, 32), (88, 32), (32, 88)] * 2
    by = clean["linear_bits_by_buffer"]
    assert by["codes0"] == sum(packed_nbytes(o * math.ceil(i / d), int(math.log2(K))) * 8 for o, i in layers)
    assert by["codebooks"] == sum(min(G, o) * K * d * 16 for o, _ in layers)
    assert by["groups"] == sum(packed_nbytes(o, math.ceil(math.log2(min(G, o)))) * 8 for o, _ in layers)
    assert set(by) == {"codes0", "codebooks", "groups"}
    assert clean["bpw"] == pytest.approx(sum(by.values()) / sum(o * i for o, i in layers))
    again = run_job(tiny_cfg(*args, f"checkpoint={resumed['quantize']['checkpoint']}"), tmp_path / "d")
    assert again["bpw"] == resumed["bpw"] and again["ppl"] == resumed["ppl"]
    # load_quantized rebuilds the JLCM layers; the exported transformers directory computes the same logits
    from transformers import AutoModelForCausalLM

    from ttvq_bench.export import export, load_quantized

    ck, cache_dir = resumed["quantize"]["checkpoint"], tiny_cfg().cache_dir
    lm = load_quantized(ck, cache_dir=cache_dir)
    assert len(modules_of(lm.model, JLCMLinear)) == 14
    ids = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(export(ck, tmp_path / "hf", cache_dir=cache_dir), local_files_only=True)
    with torch.no_grad():
        ref, got = lm.model(input_ids=ids).logits, hf.eval()(input_ids=ids).logits
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
