"""RTN / ScalarQuantLinear: hand-computed grids, groups, storage accounting, reload, forward."""
import json
import math

import pytest
import torch
from torch import nn

from ttvq_bench.errors import ConfigError, QuantizationError
from ttvq_methods.packing import unpack
from ttvq_methods.registry import LAYERS, METHODS
from ttvq_methods.rtn import RTN, RTNConfig
from ttvq_methods.scalar import ScalarQuantLinear


def linear(W, bias=None):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(W)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def rtn(W, bits, group_size=-1, sym=False, bias=None):
    return RTN(RTNConfig(group_size=group_size, sym=sym), bits).quantize_layer("l", linear(W, bias), None)


def codes_of(q):
    return unpack(q.codes, q.bits, q.n_weights).view(q.out_features, q.in_features)


def test_2x4_two_bit_asymmetric_by_hand():
    W = torch.tensor([[2.0, -1.0, 0.6, 0.0],
                      [0.2, 0.7, 1.2, 1.5]])
    q = rtn(W, 2)
    # row 0: range [-1, 2] -> scale 3/3 = 1, zero = round(1/1) = 1; codes round(w)+1
    # row 1: range [min(0.2, 0), 1.5] = [0, 1.5] -> scale 0.5, zero 0; codes round(w/0.5)
    assert codes_of(q).tolist() == [[3, 0, 2, 1], [0, 1, 2, 3]]
    assert q.scales.tolist() == [[1.0], [0.5]]
    assert unpack(q.zeros, 2, 2).tolist() == [1, 0]
    assert q.dequantize().tolist() == [[2.0, -1.0, 1.0, 0.0], [0.0, 0.5, 1.0, 1.5]]
    # codes 8 x 2 bits = 2 bytes, scales 2 x fp16, zeros 2 x 2 bits -> 1 byte
    assert q.stored_bits() == 16 + 32 + 8


def test_scale_is_rounded_to_fp16_before_coding():
    W = torch.tensor([[0.0, 0.1, 0.4, 0.3]])
    q = rtn(W, 2)
    s = 0.13330078125  # fp16 nearest to 0.4/3 = 0.13333...
    assert q.scales.item() == s
    # 0.1/s = 0.750, 0.4/s = 3.0007, 0.3/s = 2.2505 -> codes 0, 1, 3, 2 (zero point 0)
    assert codes_of(q).tolist() == [[0, 1, 3, 2]]
    assert q.dequantize().tolist() == [[0.0, s, 3 * s, 2 * s]]


def test_symmetric_two_bit_by_hand():
    W = torch.tensor([[-1.5, -0.6, 0.4, 1.0]])
    q = rtn(W, 2, sym=True)
    # range ±1.5 -> scale 3/3 = 1, zero fixed (3+1)/2 = 2; round(-1.5) = -2 (half to even)
    assert codes_of(q).tolist() == [[0, 1, 2, 3]]
    assert q.dequantize().tolist() == [[-2.0, -1.0, 0.0, 1.0]]
    assert "zeros" not in q.state_dict()
    assert q.stored_bits() == 8 + 16  # 4 codes x 2 bits, one fp16 scale


def test_all_zero_row_and_one_bit():
    q = rtn(torch.zeros(2, 5), 3)
    assert torch.equal(q.dequantize(), torch.zeros(2, 5))
    q = rtn(torch.tensor([[-0.5, 0.2, 0.8, 1.0]]), 1)
    # range [-0.5, 1] -> scale 1.5, zero round(1/3) = 0: grid {0, 1.5}; 0.8/1.5 = 0.53 -> 1
    assert q.dequantize().tolist() == [[0.0, 0.0, 1.5, 1.5]]


def test_groups_172_by_32():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 172, generator=g)
    W[:, 160:] *= 10  # the last (short) group gets its own, much larger grid
    bits, maxq = 3, 7
    q = rtn(W, bits, group_size=32)
    assert q.n_groups == 6 and q.scales.shape == (5, 6)
    deq = q.dequantize()
    for gi, (a, b) in enumerate([(0, 32), (32, 64), (64, 96), (96, 128), (128, 160), (160, 172)]):
        w = W[:, a:b]
        lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        s = ((hi - lo) / maxq).half().float()
        z = torch.round(-lo / s).clamp(0, maxq)
        assert torch.equal(q.scales[:, gi].float(), s)
        ref = s[:, None] * (torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, maxq) - z[:, None])
        assert torch.equal(deq[:, a:b], ref)
    # error at most half a step (plus the fp16 rounding of the step)
    step = q.scales.float()[:, torch.arange(172) // 32]
    assert ((W - deq).abs() <= 0.51 * step).all()
    assert (W - deq).abs()[:, 160:].max() > (W - deq).abs()[:, :160].max()  # bigger grid, bigger error


def test_stored_bits_hand_formula():
    m, k, b, G = 5, 172, 3, 6
    q = rtn(torch.randn(m, k), b, group_size=32, bias=torch.randn(m))
    codes = math.ceil(m * k * b / 8) * 8  # 2580 bits -> 323 bytes = 2584
    scales = 16 * m * G  # 480
    zeros = math.ceil(b * m * G / 8) * 8  # 90 bits -> 12 bytes = 96
    bias = 16 * m  # 80
    assert codes + scales + zeros + bias == 3240
    assert q.stored_bits() == 3240
    assert q.bpw() == pytest.approx(3240 / (m * k))


@pytest.mark.parametrize("sym", [False, True])
def test_state_dict_round_trip_through_meta(sym):
    W, bias = torch.randn(7, 50), torch.randn(7)
    q = rtn(W, 4, group_size=16, sym=sym, bias=bias)
    meta = json.loads(json.dumps(q.meta()))  # must be JSON-able
    assert meta == dict(in_features=50, out_features=7, bits=4, group_size=16, sym=sym,
                        has_g_idx=False, has_bias=True, scale_dtype="float16")
    r = LAYERS.get("scalar").from_meta(meta)
    assert type(r) is ScalarQuantLinear
    r.load_state_dict(q.state_dict(), strict=True)
    for key, t in q.state_dict().items():
        assert torch.equal(r.state_dict()[key], t), key
    assert torch.equal(r.dequantize(), q.dequantize())


def test_forward_matches_dequantized_weight():
    W, bias = torch.randn(6, 40), torch.randn(6)
    q = rtn(W, 4, group_size=8, bias=bias)
    x = torch.randn(3, 9, 40)
    ref = x @ q.dequantize().T + bias.half().float()  # bias is stored in fp16
    assert torch.allclose(q(x), ref, atol=1e-5)
    assert (q(x) - x @ W.T - bias).abs().max() > 1e-3  # it is really quantized


def test_more_bits_less_error_and_8_bit_close():
    W = torch.randn(16, 64)
    errs = [(rtn(W, b).dequantize() - W).pow(2).mean().item() for b in range(1, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-4


def test_registry_and_bits_and_nan():
    cls = METHODS.get("rtn")
    assert cls is RTN and cls.Config is RTNConfig and not RTN.needs_hessian
    with pytest.raises(ConfigError):
        RTN(RTNConfig(), 9)
    W = torch.randn(3, 8)
    W[1, 2] = float("nan")
    with pytest.raises(QuantizationError):
        rtn(W, 4)


def test_fp32_scales_are_stored_and_counted_at_32_bits():
    from ttvq_methods.rtn import RTN, RTNConfig

    lin = torch.nn.Linear(40, 6, bias=False)
    q16 = RTN(RTNConfig(), 3).quantize_layer("l", lin, None)
    q32 = RTN(RTNConfig(scale_dtype="float32"), 3).quantize_layer("l", lin, None)
    assert q32.scales.dtype == torch.float32 and q32.stored_bits() - q16.stored_bits() == 6 * 16
    # fp16 scales are rounded before the codes are chosen; fp32 ones are not rounded at all
    assert not torch.equal(q32.scales.float(), q16.scales.float())
    assert (q32.dequantize() - lin.weight).abs().max() <= (q32.scales.max() / 2) + 1e-6
