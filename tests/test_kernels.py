"""Triton kernels against the layer's own dequantize() in float64, on every layout the methods
produce (both VQ orientations, M codebooks, outliers with a codebook or in fp16, line/tensor
norms with bias, LoRA, code widths 1 to 32 bits; scalar 1 to 16 bits, groups with a short tail,
act-order maps, symmetric), odd shapes (172 and 260 rows), fresh inputs per call, 1 token (the
elementwise path) and several (the tl.dot path), split-K forced. Without a GPU they run in
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 from conftest.py); with one, the same
tests run the compiled kernels on CUDA tensors.

GEMV kernels add into an fp32 accumulator they zero themselves, so an output they never reach
reads 0 and fails the comparison; the dequantize kernel writes every element once, so its
output buffer is poisoned with NaN first. Also: which kernel the selector picks, the layout
cache following new codes, the record's speed figures and the benchmark's JSON.
"""
import contextlib
import copy
import json
import random

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from ttvq_kernels import bench, dequant, lut, scalar_gemv, speed, vq_gemv  # noqa: E402
from ttvq_kernels.device import cpu_interpreter, interpreting  # noqa: E402
from ttvq_kernels.layout import vq_passes  # noqa: E402
from ttvq_kernels.selector import kernel_name  # noqa: E402
from ttvq_kernels.synthetic import random_scalar, random_vq  # noqa: E402
from ttvq_methods.layers import QuantizedLinear  # noqa: E402
from ttvq_methods.model_walk import modules_of, set_module  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET was not set before the kernels were imported", allow_module_level=True)


def on_device():
    """Kernels take CPU tensors only inside cpu_interpreter(); CUDA tensors always."""
    return cpu_interpreter() if DEV == "cpu" else contextlib.nullcontext()


VQ_CASES = {
    # VPTQ/TTVQ: vectors along output rows, a residual codebook, outlier columns with their own
    # codebook, per-column norm scale and bias, bias, LoRA; 3 does not divide 172 (padding)
    "out-residual-outliers-lora": dict(out_f=172, in_f=96, d=3, sizes=[16, 8], orientation="out", n_out=3,
                                       outlier_d=2, outlier_k=16, norm="line", norm_bias=True, has_bias=True,
                                       lora_rank=2),
    "out-fp16-outliers-tensor-norm": dict(out_f=260, in_f=64, d=4, sizes=[256], orientation="out", n_out=2,
                                          norm="tensor", has_bias=True),
    "out-1bit-codes": dict(out_f=260, in_f=40, d=2, sizes=[2, 2], orientation="out", norm="line"),
    "out-16bit-codes": dict(out_f=172, in_f=48, d=2, sizes=[40000], orientation="out"),  # codes >= 2^15 in int16
    # AQLM-style: vectors along inputs, 3 additive codebooks, per-row norm
    "in-aqlm-3-codebooks": dict(out_f=172, in_f=100, d=8, sizes=[256, 256, 256], orientation="in", norm="line"),
    "in-outliers-lora": dict(out_f=260, in_f=200, d=3, sizes=[16, 4], orientation="in", n_out=2, outlier_d=3,
                             outlier_k=8, norm="line", norm_bias=True, has_bias=True, lora_rank=3),
    "in-fp16-outliers-32bit-codes": dict(out_f=172, in_f=40, d=1, sizes=[70000], orientation="in", n_out=1,
                                         norm="tensor", norm_bias=True),
}
LUT_CASES = ["in-aqlm-3-codebooks", "in-outliers-lora"]
SCALAR_CASES = {
    "2bit-g32-bias": dict(out_f=172, in_f=200, bits=2, group_size=32, has_bias=True),
    "3bit-sym-actorder-tail": dict(out_f=260, in_f=200, bits=3, group_size=64, sym=True, act_order=True),
    "4bit-per-row": dict(out_f=172, in_f=96, bits=4, group_size=-1),
    "1bit-g16": dict(out_f=260, in_f=80, bits=1, group_size=16),
    "5bit-actorder": dict(out_f=172, in_f=120, bits=5, group_size=40, act_order=True),
    "16bit-g50": dict(out_f=172, in_f=100, bits=16, group_size=50, has_bias=True),
}
# (tokens, split-K): one token takes the elementwise path, several take tl.dot
CALLS = [(1, None), (16, 3)]
_seed = iter(range(10_000, 1_000_000))  # every call draws fresh inputs


def vq(case, seed=0):
    kw = dict(VQ_CASES[case])
    return random_vq(kw.pop("out_f"), kw.pop("in_f"), kw.pop("d"), kw.pop("sizes"), kw.pop("orientation"),
                     seed=seed, **kw).to(DEV)


def scalar(case, seed=0):
    kw = dict(SCALAR_CASES[case])
    return random_scalar(kw.pop("out_f"), kw.pop("in_f"), kw.pop("bits"), kw.pop("group_size"), seed=seed,
                         **kw).to(DEV)


def tokens(layer, T, dtype=torch.float32, lead=()):
    g = torch.Generator().manual_seed(next(_seed))
    return torch.randn(*lead, T, layer.in_features, generator=g).to(DEV, dtype)


def check(y, layer, x):
    """y == x @ Ŵ.T + bias within fp32 accumulation error (float64 reference)."""
    W = layer.dequantize().double()  # includes LoRA
    xd = x.double().reshape(-1, layer.in_features)
    ref = xd @ W.T
    if layer.has_bias:
        ref = ref + layer.bias.double()
    # |error| <= ~n u sum|x||w| for a sum of n fp32 products; plus the output's own rounding
    mag = xd.abs() @ W.abs().T + (layer.bias.double().abs() if layer.has_bias else 0)
    out_eps = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}[x.dtype]
    tol = 2 * layer.in_features * 2**-24 * mag + out_eps * mag
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    err = (y.double().reshape(ref.shape) - ref).abs()
    assert torch.isfinite(err).all() and (err <= tol).all(), f"max err {err.max():.3g}, tol there {tol.flatten()[err.argmax()]:.3g}"


@pytest.mark.parametrize("T,split", CALLS)
@pytest.mark.parametrize("case", VQ_CASES)
def test_vq_gemv_matches_dequantized_reference(case, T, split):
    L = vq(case)
    with on_device():
        for _ in range(2):  # the second call reuses the cached layout, on fresh inputs
            x = tokens(L, T)
            check(vq_gemv.gemv(L, x, split=split), L, x)


@pytest.mark.parametrize("T,split", [(1, None), (7, 2)])
@pytest.mark.parametrize("case", LUT_CASES)
def test_lut_gemv_matches_dequantized_reference(case, T, split):
    L = vq(case)
    x = tokens(L, T)
    with on_device():
        check(lut.lut_gemv(L, x, split=split), L, x)


@pytest.mark.parametrize("case", ["in-aqlm-3-codebooks"])
def test_lut_torch_matches_dequantized_reference(case):
    L = vq(case)
    x = tokens(L, 3)
    check(lut.lut_torch(L, x), L, x)
    with pytest.raises(ValueError):
        lut.lut_torch(vq("in-outliers-lora"), x)


@pytest.mark.parametrize("T,split", CALLS)
@pytest.mark.parametrize("case", SCALAR_CASES)
def test_scalar_gemv_matches_dequantized_reference(case, T, split):
    L = scalar(case)
    x = tokens(L, T)
    with on_device():
        check(scalar_gemv.gemv(L, x, split=split), L, x)


@pytest.mark.parametrize("draw", range(16))
def test_random_layouts_every_kernel(draw):
    """Random shapes (1 to 300 on each side), vector lengths, codebook counts and sizes (1 to 13
    bits), outliers, norms, bias, LoRA and token counts: GEMV, LUT (when it applies) and the
    dequantize kernel, all against the same layer."""
    g = random.Random(draw)
    out_f, in_f, orientation = g.randint(1, 300), g.randint(1, 300), g.choice(["out", "in"])
    n_lines = in_f if orientation == "out" else out_f
    sizes = [g.choice([2, 3, 16, 100, 256, 300, 5000]) for _ in range(g.randint(1, 3))]
    n_out = g.choice([0, min(3, n_lines - 1)])
    L = random_vq(out_f, in_f, g.randint(1, 9), sizes, orientation, n_out=n_out, outlier_d=g.randint(1, 5),
                  outlier_k=g.choice([0, 16]), norm=g.choice(["none", "tensor", "line"]), norm_bias=g.random() < 0.5,
                  has_bias=g.random() < 0.5, lora_rank=g.choice([0, 2]), seed=draw).to(DEV)
    S = random_scalar(out_f, in_f, g.randint(1, 16), g.choice([-1, 8, 50, 128]), sym=g.random() < 0.5,
                      act_order=g.random() < 0.5, has_bias=g.random() < 0.5, seed=draw).to(DEV)
    T = g.randint(1, 16)
    with on_device():
        for layer, run in [(L, vq_gemv.gemv), (S, scalar_gemv.gemv)] + (
                [(L, lut.lut_gemv)] if orientation == "in" and max(sizes) <= lut.MAX_K else []):
            x = tokens(layer, T)
            check(run(layer, x, split=g.choice([None, 2])), layer, x)
        for layer in (L, S):
            w = dequant.dequantize(layer, out=torch.full((out_f, in_f), float("nan"), device=DEV))
            if getattr(layer, "lora_rank", 0):
                w = w + layer.float_param("lora_B") @ layer.float_param("lora_A")
            assert torch.equal(w, layer.dequantize())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations_and_leading_dims(dtype):
    """fp16/bf16 inputs are upcast in the kernel (the interpreter's bf16 tl.dot is wrong)."""
    L, S = vq("out-residual-outliers-lora"), scalar("2bit-g32-bias")
    with on_device():
        for layer, run in ((L, vq_gemv.gemv), (S, scalar_gemv.gemv)):
            x = tokens(layer, 3, dtype, lead=(2,))
            check(run(layer, x), layer, x)


@pytest.mark.parametrize("case", [*VQ_CASES, *SCALAR_CASES])
def test_dequantize_kernel_is_bit_identical(case):
    L = vq(case) if case in VQ_CASES else scalar(case)
    ref = L.dequantize()
    out = torch.full_like(ref, float("nan"))
    with on_device():
        w = dequant.dequantize(L, out=out)
    assert w is out
    if getattr(L, "lora_rank", 0):  # the kernel leaves LoRA to the matmul path; dequantize() adds it last
        w = w + L.float_param("lora_B") @ L.float_param("lora_A")
    assert torch.equal(w, ref)


@pytest.mark.parametrize("make", [lambda: vq("in-outliers-lora"), lambda: scalar("3bit-sym-actorder-tail")])
def test_prefill_goes_through_dequantize_and_matmul(make):
    L = make()
    x = tokens(L, 20)
    with on_device():
        assert kernel_name(L, x) == "triton_dequant"
        check(L(x), L, x)  # through QuantizedLinear.forward and the selector


def test_selector_picks_by_device_layout_tokens_and_mode():
    out, in_big_k, S = vq("out-fp16-outliers-tensor-norm"), vq("in-fp16-outliers-32bit-codes"), scalar("4bit-per-row")
    in_k256 = random_vq(1024, 16, 8, [256], "in").to(DEV)  # 1024 rows of 8-bit codes: a 256-entry table fits
    one = lambda L, T=1: tokens(L, T)  # noqa: E731
    if DEV == "cpu":  # outside the opt-in, CPU tensors keep the torch path (every other test relies on it)
        assert {kernel_name(L, one(L)) for L in (out, in_big_k, S, in_k256)} == {"torch"}
    with on_device():
        assert kernel_name(out, one(out)) == kernel_name(in_big_k, one(in_big_k)) == "triton_vq_gemv"
        assert kernel_name(out, one(out, 16)) == "triton_vq_gemv" and kernel_name(out, one(out, 17)) == "triton_dequant"
        assert kernel_name(S, one(S, 16)) == "triton_scalar_gemv" and kernel_name(S, one(S, 17)) == "triton_dequant"
        assert kernel_name(in_k256, one(in_k256)) == "triton_vq_lut"
        assert kernel_name(in_k256, one(in_k256, 2)) == "triton_vq_gemv"  # a 2-token table outgrows the codes
        x = one(out).requires_grad_()
        assert kernel_name(out, x) == "torch"  # kernels have no backward
        with torch.no_grad():
            assert kernel_name(out, x) == "triton_vq_gemv"
        assert kernel_name(out, one(out).to(torch.float64)) == "torch"
        out.make_trainable()
        assert kernel_name(out, one(out)) == "torch"
        out.make_stored()
        assert kernel_name(out, one(out)) == "triton_vq_gemv"


def test_layout_cache_reused_and_rebuilt_with_new_codes():
    L, other = vq("in-outliers-lora", seed=1), vq("in-outliers-lora", seed=2)
    first = vq_passes(L)
    assert vq_passes(L) is first  # not rebuilt per call
    L.load_state_dict(other.state_dict())  # in-place copies: every buffer's version moves
    assert vq_passes(L) is not first
    x = tokens(L, 1)
    with on_device():
        check(vq_gemv.gemv(L, x), other, x)
        before = vq_passes(L)
        u = L.int_codes()
        L.set_codes([(u[f"codes{m}"] + 1) % K for m, K in enumerate(L.codebook_sizes)], u["outlier_lines"],
                    u["outlier_codes"])
        assert vq_passes(L) is not before
        x = tokens(L, 4)
        check(vq_gemv.gemv(L, x), L, x)
        S, S2 = scalar("2bit-g32-bias", seed=1), scalar("2bit-g32-bias", seed=2)
        S.load_state_dict(S2.state_dict())
        x = tokens(S, 1)
        check(scalar_gemv.gemv(S, x), S2, x)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.5)  # context matters
    return LlamaForCausalLM(cfg).eval()


def quantized_copy(model):
    """Every decoder linear replaced by a random stored layer: VQ for attention, scalar for the MLP."""
    q = copy.deepcopy(model)
    for i, (name, lin) in enumerate(n for n in q.model.named_modules() if isinstance(n[1], nn.Linear)):
        o, k = lin.weight.shape
        layer = random_vq(o, k, 4, [16], "out", norm="line", seed=i) if "attn" in name else random_scalar(o, k, 4, 16, seed=i)
        set_module(q.model, name, layer)
    return q


def test_speed_measure_reports_layers_and_decode():
    ref = tiny_llama()
    q = quantized_copy(ref)
    n_quant = len(modules_of(q, QuantizedLinear))
    s = speed.measure(q, ref, [1, 5, 7], n_new_tokens=4, repeats=1, layer_repeats=3)
    json.dumps(s)  # goes into the record as is
    assert {r["kind"] for r in s["layers"]} == {"vq", "scalar"}
    shapes = [(r["kind"], *r["shape"]) for r in s["layers"]]
    assert len(shapes) == len(set(shapes)) and sum(r["n_layers"] for r in s["layers"]) == n_quant
    assert all(r["ms"] > 0 and r["dense_ms"] > 0 and r["speedup"] > 0 for r in s["layers"])
    d = s["decode"]
    assert d["prompt_tokens"] == 3 and d["new_tokens"] == 4 and d["tokens_per_s"] > 0 and d["reference_tokens_per_s"] > 0
    assert sum(d["kernels"].values()) == n_quant and 0 <= d["token_agreement"] <= 1
    if DEV == "cpu":
        assert set(d["kernels"]) == {"torch"} and s["device"].startswith("cpu")
    # the timed greedy loop (KV cache) produces the tokens of a plain full-sequence argmax loop
    prompt = torch.tensor([1, 5, 7])
    ids, _, _ = speed.greedy(ref, prompt, 8)
    seq = prompt.tolist()
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
    assert ids == seq[3:]


def test_speed_layer_rows_name_the_kernel_that_ran():
    ref = nn.Sequential(nn.Linear(96, 172, bias=False)).eval()
    q = nn.Sequential(random_vq(172, 96, 4, [16], "out")).eval()
    with on_device():
        rows = speed.layer_speed(q.to(DEV), ref.to(DEV), repeats=3)
    assert [(r["kernel"], r["shape"]) for r in rows] == [("triton_vq_gemv", [172, 96])]


def test_bench_writes_json_with_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(["--shapes", "", "--shape", "64x96", "--layouts", "aqlm2,rtn3", "--batch", "1,2",
                      "--repeats", "3", "--copy-mb", "8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == res["rows"] and saved["copy_gbs"] > 0
    rows = res["rows"]
    assert {(r["layout"], r["batch"]) for r in rows} == {(a, b) for a in ("aqlm2", "rtn3") for b in (1, 2)}
    for r in rows:
        assert r["ms"] > 0 and r["gbs"] > 0 and r["speedup"] > 0 and 0 < r["of_limit"] and r["bytes"] > 0
    assert all(sum(r["selected"] for r in rows if (r["layout"], r["batch"]) == k) == 1
               for k in {(r["layout"], r["batch"]) for r in rows})
    if DEV == "cpu":
        assert {r["kernel"] for r in rows} == {"torch", "torch_lut"}
