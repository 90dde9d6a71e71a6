"""GPTQ: beats RTN on the proxy loss, reduces to RTN when H = I, matches an independent OBS
reference, stores exactly what it computed, and fails loudly on bad input."""
import json

import pytest
import torch
from torch import nn

from ttvq_bench.errors import QuantizationError
from ttvq_methods.gptq import GPTQ, GPTQConfig, gptq_quantize
from ttvq_methods.registry import LAYERS, METHODS
from ttvq_methods.second_order import HessianAccumulator, layer_proxy_loss
from ttvq_methods.scalar import quant_params, quantize_to_codes, rtn_quantize

K, M = 172, 48  # 172 is not a multiple of 32: last group has 12 columns


def correlated_hessian(k, n=4096, seed=0):
    """Inputs with a few strong shared directions and uneven feature scales, like activations."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g)  # low-rank shared part
    X = Z + 0.3 * torch.randn(n, k, generator=g) * torch.rand(k, generator=g) * 3
    acc = HessianAccumulator(k)
    for b in X.split(1000):
        acc.add_batch(b)
    return acc.H, X


def rtn_deq(W, bits, gs, sym=False):
    codes, s, z = rtn_quantize(W, bits, gs, sym)
    gi = torch.arange(W.shape[1]) // (gs if s.shape[1] > 1 else W.shape[1])
    return s[:, gi] * (codes - z[:, gi]), codes


@pytest.fixture(scope="module")
def setup():
    H, X = correlated_hessian(K)
    W = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    return W, H, X


def test_hessian_accumulator_is_running_mean(setup):
    _, H, X = setup
    ref = X.double().T @ X.double() / X.shape[0]
    assert torch.allclose(H.double(), ref, rtol=1e-5, atol=1e-6)
    acc = HessianAccumulator(3)
    acc.add_batch(torch.tensor([[[1.0, 0, 0]], [[0, 2.0, 0]]]))  # (2, 1, 3): two samples
    assert acc.n_samples == 2
    assert acc.hessian(torch.float64).tolist() == [[0.5, 0, 0], [0, 2.0, 0], [0, 0, 0]]
    # proxy loss is the mean squared output error on those inputs
    W, Wq = torch.randn(4, K), torch.randn(4, K)
    out = ((X.double() @ (W - Wq).double().T) ** 2).sum(1).mean()
    assert layer_proxy_loss(W, Wq, H) == pytest.approx(out.item(), rel=1e-4)


def test_hessians_of_a_group_stop_the_forward_once_collected():
    # a true-sequential group's pass stops at its last linear: the same H as a full pass, and
    # the MLP never starts for the attention projections
    from transformers import LlamaConfig, LlamaForCausalLM

    from ttvq_methods.model_walk import capture_inputs, linears
    from ttvq_methods.second_order import _accumulate, collect_hessians

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    inputs = capture_inputs(model, torch.randint(0, 64, (6, 16)), batch_size=4)
    block = model.model.layers[0]
    mlp_calls = []
    block.mlp.register_forward_pre_hook(lambda *a: mlp_calls.append(1))  # the MLP starts
    full = _accumulate(block, list(linears(block)), inputs, diag_only=False)[0]
    assert len(mlp_calls) == 2  # two batches
    for group, mlp_runs in ((["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], 0),
                            (["self_attn.o_proj"], 0), (["mlp.down_proj"], 2)):
        mlp_calls.clear()
        H = collect_hessians(block, group, inputs)
        assert len(mlp_calls) == mlp_runs
        assert set(H) == set(group) and all(torch.equal(H[n], full[n]) for n in group)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gs", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(setup, bits, gs, act_order):
    W, H, _ = setup
    r = gptq_quantize(W, H, bits, gs, act_order=act_order)
    l_gptq = layer_proxy_loss(W, r.Q, H)
    l_rtn = layer_proxy_loss(W, rtn_deq(W, bits, gs)[0], H)
    assert l_gptq < 0.8 * l_rtn, (l_gptq, l_rtn)


@pytest.mark.parametrize("gs,act_order", [(-1, False), (32, False), (32, True), (-1, True)])
def test_identity_hessian_is_rtn(setup, gs, act_order):
    # H = I: Cholesky factor of H⁻¹ is diagonal, so no error is propagated; the stable sort
    # keeps column order under act_order. Codes and values must equal RTN's exactly.
    W = setup[0]
    r = gptq_quantize(W, torch.eye(K), 3, gs, act_order=act_order, percdamp=1e-8)
    deq, codes = rtn_deq(W, 3, gs)
    assert torch.equal(r.codes, codes)
    assert torch.equal(r.Q, deq)


def obs_reference(W, H, bits, percdamp=0.01):
    """Independent per-row GPTQ in float64: the OBS form, re-deriving H⁻¹ after each column
    instead of using its Cholesky factor and lazy blocks."""
    W = W.double().clone()
    k = W.shape[1]
    H = H.double() + percdamp * H.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    scale, zero = quant_params(W.float(), bits, False)
    scale, zero = scale.double(), zero.double()
    Q = torch.zeros_like(W)
    for i in range(k):
        q = scale * (quantize_to_codes(W[:, i], scale, zero, bits) - zero)
        Q[:, i] = q
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= torch.outer(err, Hinv[i, i:])
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return Q.float()


def test_matches_obs_reference(setup):
    W, H, _ = setup
    r = gptq_quantize(W, H, 4)
    ref = obs_reference(W, H, 4)
    assert (r.Q == ref).float().mean() > 0.99  # a few codes may flip on fp32 vs fp64 ties
    assert layer_proxy_loss(W, r.Q, H) == pytest.approx(layer_proxy_loss(W, ref, H), rel=0.02)


@pytest.mark.parametrize("gs", [-1, 48])
def test_blocksize_does_not_change_result(gs):
    # k = 300 spans 3 blocks of 128; groups of 48 straddle block boundaries (96..143).
    H, _ = correlated_hessian(300, n=2048, seed=3)
    W = torch.randn(32, 300, generator=torch.Generator().manual_seed(4))
    qs = [gptq_quantize(W, H, 3, gs, act_order=True, blocksize=b) for b in (128, 37, 1)]
    for r in qs[1:]:
        assert (r.codes == qs[0].codes).float().mean() > 0.995
        assert layer_proxy_loss(W, r.Q, H) == pytest.approx(layer_proxy_loss(W, qs[0].Q, H), rel=1e-2)


@pytest.mark.parametrize("kw,stores_g_idx", [
    (dict(group_size=32, act_order=True), True),
    (dict(group_size=32, act_order=True, static_groups=True), False),
    (dict(group_size=32, act_order=False, sym=True), False),
    (dict(group_size=-1, act_order=True), False),
])
def test_layer_stores_exactly_what_gptq_computed(setup, kw, stores_g_idx):
    W, H, _ = setup
    bias = torch.randn(M)
    lin = nn.Linear(K, M)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(bias)
    cfg = GPTQConfig(**kw)
    layer = GPTQ(cfg, 3).quantize_layer("blk.0.q", lin, H)
    r = gptq_quantize(W, H, 3, cfg.group_size, cfg.sym, cfg.act_order, cfg.static_groups)
    assert torch.equal(layer.dequantize(), r.Q)  # bit-exact
    assert layer.has_g_idx == stores_g_idx
    if stores_g_idx:  # act_order groups: 32 columns each in processing order, last one 12
        assert torch.bincount(layer.column_groups()).tolist() == [32] * 5 + [12]
        assert not torch.equal(layer.column_groups(), torch.arange(K) // 32)
    # reload through meta, bit-exact
    re = LAYERS.get("scalar").from_meta(json.loads(json.dumps(layer.meta())))
    re.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(re.dequantize(), r.Q)
    x = torch.randn(5, K)
    assert torch.allclose(re(x), x @ r.Q.T + bias.half().float(), atol=1e-4)


def test_static_groups_use_original_weight_grid(setup):
    # static groups fit each group's grid to the unmodified weight, so scales equal RTN's
    W, H, _ = setup
    r = gptq_quantize(W, H, 3, 32, act_order=True, static_groups=True)
    assert torch.equal(r.scales, rtn_quantize(W, 3, 32, False)[1])


def test_dead_input_column_is_zeroed(setup):
    W, H, _ = setup
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0
    r = gptq_quantize(W, H, 4, act_order=True)
    assert torch.all(r.Q[:, 5] == 0)
    assert torch.isfinite(r.Q).all()


def test_bad_inputs_raise(setup):
    W, H, _ = setup
    Wn = W.clone()
    Wn[3, 7] = float("nan")
    with pytest.raises(QuantizationError):
        gptq_quantize(Wn, H, 4)
    Hn = H.clone()
    Hn[0, 1] = float("inf")
    with pytest.raises(QuantizationError):
        gptq_quantize(W, Hn, 4)
    with pytest.raises(QuantizationError):  # wrong shape / missing
        gptq_quantize(W, H[:10, :10], 4)
    with pytest.raises(QuantizationError):
        GPTQ(GPTQConfig(), 4).quantize_layer("l", nn.Linear(K, M), None)
    # eigenvalues 11 and -9: even damping 1.0 x mean(diag) = 1 leaves it indefinite
    with pytest.raises(QuantizationError):
        gptq_quantize(torch.randn(3, 2), torch.tensor([[1.0, 10.0], [10.0, 1.0]]), 4)


def test_more_damping_rescues_slightly_indefinite_hessian():
    # eigenvalues 1.95 and -0.05: damping 0.01 fails, the 10x retry (0.1) succeeds
    H = torch.tensor([[0.95, 1.0], [1.0, 0.95]])
    r = gptq_quantize(torch.randn(3, 2), H, 4)
    assert torch.isfinite(r.Q).all()


def test_registered():
    cls = METHODS.get("gptq")
    assert cls is GPTQ and cls.Config is GPTQConfig and GPTQ.needs_hessian
