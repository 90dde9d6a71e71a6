"""VQLinear: reconstruction against a naive reference in both orientations (padding, M
codebooks, outliers, norms), exact packing, bits = buffers, checkpoints bit-exact (today's and
those written before M codebooks), shared codebooks stored and counted once and shared again
after loading."""
import math

import pytest
import torch
from torch import nn

from ttvq_methods.bits import count_bits
from ttvq_methods.checkpoint import load_module_state, read_meta, save_module_state
from conftest import ROOT
from ttvq_methods.registry import LAYERS
from ttvq_methods.vq.codebook import tie_shared
from ttvq_methods.vq.layer import VQLinear


def random_layer(out_f=172, in_f=20, orientation="out", d=8, K=32, Kr=8, n_out=3, do=2, Ko=16, norm="line",
                 norm_bias=True, has_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = VQLinear(in_f, out_f, d, [K] + ([Kr] if Kr else []), orientation, n_out, do, Ko, norm, norm_bias, has_bias)
    L.codebook0.copy_(torch.randn(K, d, generator=g).half())
    codes = torch.randint(0, K, (L.n_reg, L.nv), generator=g)
    res = torch.randint(0, Kr, (L.n_reg, L.nv), generator=g) if Kr else None
    lines = torch.randperm(L.n_lines, generator=g)[:n_out].sort().values
    ocodes = ovals = None
    if n_out and Ko:
        L.outlier_codebook.copy_(torch.randn(Ko, do, generator=g).half())
        ocodes = torch.randint(0, Ko, (n_out, L.nvo), generator=g)
    elif n_out:
        ovals = torch.randn(n_out, L.line_len, generator=g)
    if Kr:
        L.codebook1.copy_(torch.randn(Kr, d, generator=g).half() * 0.1)
    L.set_codes([codes] + ([res] if Kr else []), lines, ocodes, ovals)
    if norm != "none":
        n = L.n_lines if norm == "line" else 1
        L.set_norm(torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) if norm_bias else None)
    if has_bias:
        L.bias.copy_(torch.randn(out_f, generator=g).half())
    return L, dict(codes=codes, res=res, lines=lines, ocodes=ocodes, ovals=ovals)


def naive_weight(L, parts):
    """Line by line, vector by vector, straight from the definitions in layer.py."""
    W_lines = torch.zeros(L.n_lines, L.line_len)
    reg = [i for i in range(L.n_lines) if i not in set(parts["lines"].tolist())]
    for r, line in enumerate(reg):
        vals = []
        for v in range(L.nv):
            c = L.codebook0[parts["codes"][r, v]].float()
            if L.M == 2:
                c = c + L.codebook1[parts["res"][r, v]].float()
            vals.append(c)
        W_lines[line] = torch.cat(vals)[: L.line_len]
    for o, line in enumerate(parts["lines"].tolist()):
        if L.outlier_codebook_size:
            W_lines[line] = torch.cat([L.outlier_codebook[parts["ocodes"][o, v]].float() for v in range(L.nvo)])[: L.line_len]
        else:
            W_lines[line] = parts["ovals"][o].half().float()
    if L.norm != "none":
        W_lines = W_lines * L.norm_scale.float()[:, None]
        if L.has_norm_bias:
            W_lines = W_lines + L.norm_bias.float()[:, None]
    return W_lines.T if L.orientation == "out" else W_lines


CASES = {
    "out-pad-res-outl": dict(),
    "in-orientation": dict(orientation="in", out_f=24, in_f=50, d=4, n_out=2, do=3),
    "fp16-outliers-tensor-norm": dict(Ko=0, norm="tensor", has_bias=False),
    "plain": dict(Kr=0, n_out=0, norm="none", has_bias=False, d=4, out_f=64, in_f=16),
    "scale-only": dict(norm_bias=False, Kr=0),
}


@pytest.mark.parametrize("case", CASES)
def test_dequantize_matches_definition_and_forward(case):
    L, parts = random_layer(**CASES[case])
    W = L.dequantize()
    assert W.shape == (L.out_features, L.in_features)
    assert torch.allclose(W, naive_weight(L, parts), atol=1e-6)
    u = L.int_codes()  # packing round-trips exactly
    assert torch.equal(u["codes0"], parts["codes"])
    if parts["res"] is not None:
        assert torch.equal(u["codes1"], parts["res"])
    if L.n_outliers:
        assert torch.equal(u["outlier_lines"], parts["lines"])
    x = torch.randn(3, 5, L.in_features)
    ref = x @ W.T + (L.bias.float() if L.has_bias else 0)
    assert torch.allclose(L(x), ref, atol=1e-5)


def test_stored_bits_by_hand():
    # out 172 (d 8 -> 22 vectors per column, the last padded), in 20, 3 outlier columns.
    L, _ = random_layer()
    n_reg, nv = 17, 22
    expect = {
        "codebook0": 32 * 8 * 16, "codes0": math.ceil(n_reg * nv * 5 / 8) * 8,
        "codebook1": 8 * 8 * 16, "codes1": math.ceil(n_reg * nv * 3 / 8) * 8,
        "outlier_lines": math.ceil(3 * 5 / 8) * 8,  # 20 lines -> 5 bits per index
        "outlier_codebook": 16 * 2 * 16, "outlier_codes": math.ceil(3 * 86 * 4 / 8) * 8,
        "norm_scale": 20 * 16, "norm_bias": 20 * 16, "bias": 172 * 16,
    }
    assert L.bits_breakdown() == expect
    assert L.stored_bits() == sum(expect.values())
    assert L.bpw() == sum(expect.values()) / (172 * 20)


class Block(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b


class Inner(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layers = nn.ModuleList(blocks)


class Model(nn.Module):
    """Just enough of a causal LM for count_bits: model.layers are the blocks."""

    def __init__(self, blocks):
        super().__init__()
        self.model = Inner(blocks)


def shared_model():
    la, _ = random_layer(seed=1)
    lb, _ = random_layer(seed=2)
    lc, _ = random_layer(seed=3)
    for L in (lb, lc):
        L.share("codebook0", la.codebook0, "model")
    la.shared["codebook0"] = "model"
    return Model([Block(la, lb), Block(lc, random_layer(seed=4)[0])]), la


def test_shared_codebook_counted_once():
    model, la = shared_model()
    c = count_bits(model)
    own = sum(m.stored_bits() for m in model.modules() if isinstance(m, VQLinear))
    cb = la.codebook0.numel() * 16
    assert c["linear_bits"] == own - 2 * cb  # three holders, one tensor
    assert c["linear_bits_by_buffer"]["codebook0"] == 2 * cb  # the shared one + layer 4's own
    assert c["model_bits"] == c["linear_bits"]


def test_checkpoint_round_trip_is_exact_and_keeps_sharing(tmp_path):
    model, la = shared_model()
    before = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, VQLinear)}
    path = tmp_path / "q.safetensors"
    save_module_state(model, path)
    meta = read_meta(path)
    assert len([a for a in meta["aliases"] if a.endswith("codebook0")]) == 2  # stored once
    assert meta["layers"]["model.layers.0.b"]["meta"]["shared"] == {"codebook0": "model"}

    fresh = Model([Block(nn.Linear(20, 172), nn.Linear(20, 172)), Block(nn.Linear(20, 172), nn.Linear(20, 172))])
    load_module_state(fresh, path)
    layers = {n: m for n, m in fresh.named_modules() if isinstance(m, VQLinear)}
    for n, m in layers.items():
        assert torch.equal(m.dequantize(), before[n])
        assert m.state_dict().keys() == dict(model.named_modules())[n].state_dict().keys()
    ptrs = {layers[n].codebook0.data_ptr() for n in ("model.layers.0.a", "model.layers.0.b", "model.layers.1.a")}
    assert len(ptrs) == 1  # shared again
    assert count_bits(fresh) == count_bits(model)
    assert LAYERS.get("vq") is VQLinear


def test_tie_shared_after_separate_loads():
    model, la = shared_model()
    lb = model.model.layers[0].b
    lb._buffers["codebook0"] = la.codebook0.clone()  # what a resume from per-block files gives
    assert count_bits(model)["linear_bits"] > count_bits(shared_model()[0])["linear_bits"]
    assert tie_shared(model) == 1
    assert lb.codebook0.data_ptr() == la.codebook0.data_ptr()
    lb._buffers["codebook0"] = la.codebook0.clone() + 1
    with pytest.raises(Exception, match="differs"):
        tie_shared(model)


def test_bad_geometry():
    with pytest.raises(ValueError):
        VQLinear(8, 8, 4, 16, orientation="diag")
    with pytest.raises(ValueError):
        VQLinear(8, 8, 4, 16, n_outliers=8)
    L = VQLinear(8, 8, 4, 16)
    with pytest.raises(ValueError):
        L.set_codes([torch.zeros(8, 3, dtype=torch.long)])
    with pytest.raises(ValueError):
        L.set_codes([torch.zeros(8, 2, dtype=torch.long)] * 2)  # one codebook, two code tensors


def test_checkpoints_written_before_m_codebooks_still_load():
    """tests/data/legacy_e71b0ef_*: every layer kind the code at e71b0ef stored (plain, residual
    with codebook outliers and a bias, orientation "in" with fp16 outliers, a shared codebook,
    "vq_lora", "scalar"), with the weights that code dequantized."""
    from safetensors.torch import load_file

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            for n, (o, i) in dict(plain=(36, 20), res_out=(35, 20), in_fp16=(12, 22), shared_a=(24, 16),
                                  shared_b=(24, 16), lora=(20, 16), scalar=(10, 40)).items():
                setattr(self, n, nn.Linear(i, o))
            self.norm = nn.LayerNorm(4)

    m = Holder()
    extra = load_module_state(m, ROOT / "tests" / "data" / "legacy_e71b0ef_layers.safetensors")
    assert extra == {"note": "written by e71b0ef"}
    expected = load_file(str(ROOT / "tests" / "data" / "legacy_e71b0ef_expected.safetensors"))
    assert set(expected) == {"plain", "res_out", "in_fp16", "shared_a", "shared_b", "lora", "scalar"}
    for n, w in expected.items():
        assert torch.equal(getattr(m, n).dequantize(), w), n
    assert m.res_out.M == 2 and m.lora.lora_rank == 2 and m.in_fp16.orientation == "in"
    assert m.shared_a.codebook0 is m.shared_b.codebook0 and m.shared_b.shared == {"codebook0": "model"}
    x = torch.randn(3, 16)
    assert torch.equal(m.lora(x), x @ expected["lora"].T)
