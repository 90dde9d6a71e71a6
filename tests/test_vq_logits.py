"""head=vq_logits (methods/heads/vq_logits.py): K = V with the identity map is the dense head
exactly; bpw_model counts codebook, map and per-token terms; checkpoints rebuild the head and
reproduce its logits; the closed-form map update and per-token fit are what they claim; the
teacher toggle; bad configs are one line; end to end on the tiny model, with the body reused
across head variants."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY
from ttvq_bench.errors import ConfigError
from ttvq_methods.bits import count_bits
from ttvq_methods.checkpoint import load_module_state, round_to_storage, save_module_state
from ttvq_methods.heads import HEADS
from ttvq_methods.heads.vq_logits import (Moments, VQLogitsConfig, VQLogitsLinear, assign, cluster_stats, code_bits,
                                          final_hidden, fit_per_token)
from ttvq_kernels.selector import kernel_name

pytestmark = pytest.mark.usefixtures("one_thread")
V, D = 64, 32


def small_llama(tied=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=88, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied,
                      initializer_range=0.2)  # logits that are far from uniform
    m = LlamaForCausalLM(cfg).eval()
    round_to_storage(m, "float16")  # as the run stores it: fp16-exact weights
    return m


def calib(n=12, T=32, seed=1):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def apply(model, ids, **kw):
    h = HEADS.get("vq_logits")(VQLogitsConfig(**{"timing": False, "epochs": 3, **kw}))
    h.prepare(model, ids)
    return h.apply(model, ids)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


# -- the layer ----------------------------------------------------------------------------------------
def test_identity_layer_is_the_dense_head_exactly():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, D, generator=g).half().float()
    x = torch.randn(3, 5, D, generator=g)
    for per_token in (False, True):
        s, b = (torch.ones(V), torch.zeros(V)) if per_token else (None, None)
        layer = VQLogitsLinear.from_parts(W, torch.arange(V), s, b).eval()
        assert kernel_name(layer, x) == "vq_logits"
        assert torch.equal(layer(x), F.linear(x, W))
        assert torch.equal(layer.dequantize(), W)


def test_kernel_matches_the_dequantized_oracle():
    g = torch.Generator().manual_seed(1)
    K = 8
    C, m = torch.randn(K, D, generator=g), torch.randint(0, K, (V,), generator=g)
    s, b = torch.rand(V, generator=g) + 0.5, torch.randn(V, generator=g)
    layer = VQLogitsLinear.from_parts(C, m, s, b, dtype="float32").eval()
    x = torch.randn(7, D, generator=g)
    ref = F.linear(x, layer.dequantize(), layer.bias)  # the torch path: s_v c_m(v) and b_v
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert torch.equal(layer.token_map(), m)
    # tokens of one cluster get logits that differ only by their own scale and bias
    y = layer(x)
    same = (m == m[0]).nonzero().squeeze(1)
    assert torch.allclose((y[:, same] - b[same]) / s[same], ((y[:, 0] - b[0]) / s[0])[:, None].expand(-1, len(same)),
                          atol=1e-4)


def test_stored_bits_are_codebook_map_and_per_token_terms():
    for K, per_token in ((16, False), (16, True), (5, True), (1, False)):
        layer = VQLogitsLinear(D, V, K, per_token=per_token)
        bits = layer.bits_by_part()
        assert bits["codebook"] == K * D * 16
        assert bits["token_codes"] == math.ceil(V * code_bits(K) / 8) * 8
        assert code_bits(K) == max(1, math.ceil(math.log2(K)))
        assert (bits.get("scale", 0), bits.get("bias", 0)) == ((V * 16, V * 16) if per_token else (0, 0))
        assert layer.stored_bits() == sum(bits.values())


# -- the head stage --------------------------------------------------------------------------------------
def test_K_equals_V_reproduces_the_dense_logits_exactly():
    ids = calib()
    for per_token in (False, True):
        m = small_llama()
        ref = logits(m, ids)
        rep = apply(m, ids, K=V, per_token=per_token)  # training is skipped: nothing to gain
        assert isinstance(m.lm_head, VQLogitsLinear)
        assert torch.equal(m.lm_head.token_map(), torch.arange(V))
        assert torch.equal(logits(m, ids), ref)
        assert rep["train"]["val_stored"] == 0.0 and rep["clusters_calib"]["e_log_cluster_size"] == 0.0


@pytest.mark.parametrize("tied", [True, False])
def test_bpw_model_counts_codebook_map_and_per_token_terms(tied):
    ids = calib()
    base = small_llama(tied)
    before = count_bits(base)
    for K, per_token in ((8, False), (8, True), (13, True)):
        m = copy.deepcopy(base)
        rep = apply(m, ids, K=K, per_token=per_token, epochs=0)
        after = count_bits(m)
        head_bits = K * D * 16 + math.ceil(V * code_bits(K) / 8) * 8 + (2 * V * 16 if per_token else 0)
        assert rep["head_bits_after"] == head_bits and rep["head_bits_before"] == V * D * 16
        # tied: the embedding stays and the head's bits come on top; untied: they replace the head's
        assert after["model_bits"] == before["model_bits"] + head_bits - (0 if tied else V * D * 16)
        assert after["model_params"] == before["model_params"]  # the FP model's parameters, counted once
        assert after["bpw_model"] == pytest.approx(after["model_bits"] / before["model_params"])
        assert rep["model_bits_added"] == after["model_bits"] - before["model_bits"]
        assert rep["tied"] is tied and not m.config.tie_word_embeddings  # untied: the embedding stays, counted
        assert torch.equal(m.model.embed_tokens.weight, base.model.embed_tokens.weight)
        assert not any(n.startswith("lm_head.") for n, _ in m.named_parameters())  # only stored buffers


def test_checkpoint_round_trip_rebuilds_the_head_and_its_logits(tmp_path):
    ids = calib()
    m = small_llama()
    apply(m, ids, K=8, per_token=True)
    ref, bits = logits(m, ids), count_bits(m)
    save_module_state(m, tmp_path / "m.safetensors", "float16")
    fresh = small_llama()  # the base model again, head tied
    load_module_state(fresh, tmp_path / "m.safetensors")
    assert isinstance(fresh.lm_head, VQLogitsLinear) and fresh.lm_head.per_token and fresh.lm_head.tied
    assert torch.equal(logits(fresh, ids), ref)
    assert count_bits(fresh)["model_bits"] == bits["model_bits"]
    assert count_bits(fresh)["bpw_model"] == bits["bpw_model"]


def test_training_lowers_the_heldout_loss_and_the_map_moves():
    ids = calib(n=16)
    m0 = small_llama()
    m = copy.deepcopy(m0)
    rep = apply(m, ids, K=8, epochs=4, lr=1e-2, val_fraction=0.25)
    tr = rep["train"]
    assert tr["val_after"] < tr["val_before"] and tr["n_val"] > 0
    assert tr["map_moved"] > 0  # the logit-MSE rule re-assigned some tokens
    frozen = copy.deepcopy(m0)
    rep2 = apply(frozen, ids, K=8, epochs=4, lr=1e-2, val_fraction=0.25, train_map=False)
    assert rep2["train"]["map_moved"] == 0.0
    # E[log |cluster(y)|] over the calibration targets, by hand
    tm = m.lm_head.token_map()
    sizes = torch.bincount(tm, minlength=8)
    y = ids[:, 1:].reshape(-1)
    assert rep["clusters_calib"]["e_log_cluster_size"] == pytest.approx(float(sizes[tm[y]].double().log().mean()))


def test_assign_is_the_empirical_logit_mse_argmin():
    g = torch.Generator().manual_seed(2)
    K, n = 6, 500
    hs, ht = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    W, C = torch.randn(V, D, generator=g), torch.randn(K, D, generator=g)
    s, b = torch.rand(V, generator=g) + 0.5, torch.randn(V, generator=g)
    for teacher in (None, ht):
        t = (hs if teacher is None else teacher) @ W.T  # (n, V) teacher logits
        a = hs @ C.T  # (n, K) codeword logits
        for sv, bv in ((None, None), (s, b)):
            pred = a[:, :, None] * (1 if sv is None else sv) + (0 if bv is None else bv)  # (n, K, V)
            brute = ((pred - t[:, None, :]) ** 2).mean(0).argmin(0)
            assert torch.equal(assign(C, W, Moments(hs, teacher), sv, bv), brute)


def test_per_token_fit_is_least_squares():
    g = torch.Generator().manual_seed(3)
    K, n = 5, 400
    hs = torch.randn(n, D, generator=g).double()
    W, C = torch.randn(V, D, generator=g).double(), torch.randn(K, D, generator=g).double()
    m = torch.randint(0, K, (V,), generator=g)
    s, b = fit_per_token(C, m, W, Moments(hs, None))
    a, t = hs @ C.T, hs @ W.T
    for v in (0, 17, 63):
        X = torch.stack([a[:, m[v]], torch.ones(n, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(X, t[:, v:v + 1]).solution.squeeze(1)
        assert torch.allclose(torch.stack([s[v], b[v]]), sol, atol=1e-6)


def test_teacher_fp_model_uses_the_hidden_states_from_before_the_body_changed():
    ids = calib()
    for teacher, exact in (("fp_head", True), ("fp_model", False)):
        m = small_llama()
        h = HEADS.get("vq_logits")(VQLogitsConfig(K=V, epochs=0, teacher=teacher, timing=False))
        h.prepare(m, ids)  # the FP model
        with torch.no_grad():  # "quantize" the body
            m.model.layers[1].mlp.down_proj.weight.mul_(0.5)
        rep = h.apply(m, ids)
        # fp_head: the dense head on the changed body, which K = V reproduces; fp_model: the
        # FP model's logits, which the changed body's hidden states do not
        assert (rep["train"]["val_stored"] == 0.0) is exact


def test_frequency_weighting_and_positions():
    ids = calib()
    a, b = small_llama(), small_llama()
    ra = apply(a, ids, K=8, epochs=0, freq_weighted=True, metric="weight")
    rb = apply(b, ids, K=8, epochs=0, freq_weighted=False, metric="weight")
    assert ra["init"]["freq_weighted"] and not torch.equal(a.lm_head.codebook, b.lm_head.codebook)
    c = small_llama()
    rc = apply(c, ids, K=8, epochs=1, max_tokens=100, val_fraction=0.25)
    assert rc["train"]["n_train"] + rc["train"]["n_val"] <= 100
    hs = final_hidden(c, ids, torch.tensor([0, 33, 64 + 5]))
    full = final_hidden(c, ids)
    assert torch.equal(hs, torch.stack([full[0, 0], full[1, 1], full[2, 5]]))


def test_cluster_stats():
    tm = torch.tensor([0, 0, 0, 1, 2, 2])
    st = cluster_stats(tm, torch.tensor([0, 3, 4, 4]), 4)
    assert st["e_log_cluster_size"] == pytest.approx((math.log(3) + 0 + 2 * math.log(2)) / 4)
    assert (st["used_codewords"], st["max_cluster"], st["singletons"]) == (3, 3, 1)


# -- config ------------------------------------------------------------------------------------------
def test_bad_config_is_one_line():
    cls = HEADS.get("vq_logits")
    for bad, key in ((dict(K=0), "head.K"), (dict(lr=0.0), "head.lr"), (dict(val_fraction=1.0), "head.val_fraction"),
                     (dict(batch_tokens=0), "head.batch_tokens"), (dict(epochs=-1), "head.epochs")):
        with pytest.raises(ConfigError, match=key) as e:
            cls(VQLogitsConfig(**bad))
        assert "\n" not in str(e.value)
    m = small_llama()
    with pytest.raises(ConfigError, match="exceeds the vocabulary"):
        cls(VQLogitsConfig(K=V + 1)).prepare(m, calib())


def test_yaml_composes(compose):
    cfg = compose(["head=vq_logits", "head.K=32", "head.per_token=true", "head.teacher=fp_model"])
    assert cfg.head.name == "vq_logits" and cfg.head.K == 32 and cfg.head.per_token and cfg.head.teacher == "fp_model"
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose(["head=vq_logits", "head.teacher=oracle"])


def test_cli_bad_K_is_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ttvq_bench", *TINY, "method=fp16", "head=vq_logits", "head.K=0",
                        f"results_dir={tmp_path}/r", f"cache_dir={tmp_path}/c", f"hydra.run.dir={tmp_path}/run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    lines = [line for line in p.stderr.strip().splitlines() if line.startswith("error:")]
    assert lines == ["error: vq_logits: head.K=0 must be >= 1"], p.stderr[-2000:]


# -- end to end ----------------------------------------------------------------------------------------
def test_run_job_records_reloads_and_reuses_the_body(tiny_cfg, tmp_path):
    from ttvq_bench.run import run_job

    # calib.seed: calibration windows of this test's own, so no other test's head=keep body is in the
    # session cache before this one writes it
    common = ("method=rtn", "bits=3", "calib.seed=7", "head=vq_logits", "head.epochs=2", "eval.speed.enabled=false")
    rec = run_job(tiny_cfg(*common, "head.K=32", "head.per_token=true"), tmp_path / "a")
    q = rec["quantize"]
    assert rec["status"] == "ok" and rec["head"] == "vq_logits" and q["body"]["source"] == "quantized"
    hr = q["head_report"]
    assert hr["K"] == 32 and hr["per_token"] and hr["tied"] and hr["head_bits_after"] < hr["head_bits_before"]
    assert set(hr["timing"]["tokens"]) == {"1", "256"} and hr["timing"]["tokens"]["1"]["dense_ms"] > 0
    assert math.isfinite(rec["ppl"]["default"]) and rec["kl"]["default"] > 0
    assert rec["bpw_model"] == pytest.approx(rec["model_bits"] / rec["model_params"])
    # the body was stored as the head=keep job's quantization: that job finds it, and so does
    # a second head variant, which quantizes only the head
    keep = run_job(tiny_cfg("method=rtn", "bits=3", "calib.seed=7", "eval.speed.enabled=false"), tmp_path / "keep")
    assert keep["quantize"]["source"] == "cache" and keep["quantize"]["layers"] == q["layers"]
    other = run_job(tiny_cfg(*common, "head.K=16"), tmp_path / "b")
    assert other["quantize"]["body"]["source"] == "cache" and other["quantize"]["layers"] == q["layers"]
    assert other["bpw"] == rec["bpw"] == keep["bpw"]
    assert other["ppl"]["default"] != rec["ppl"]["default"]
    # the checkpoint reproduces the run without re-quantizing
    again = run_job(tiny_cfg(*common, "head.K=32", "head.per_token=true", f"checkpoint={q['checkpoint']}"),
                    tmp_path / "c")
    assert again["quantize"]["source"] == "checkpoint" and again["head"] == "vq_logits"
    assert again["ppl"]["default"] == rec["ppl"]["default"] and again["bpw_model"] == rec["bpw_model"]
    assert json.loads(json.dumps(hr)) == hr  # plain JSON in the checkpoint's metadata
    # E[log cluster] over the evaluation targets of the recorded runs, from their stored maps
    from ttvq_kernels.bench_vq_logits import eval_clusters

    rows = eval_clusters(str(tmp_path / "results"), [*TINY, f"cache_dir={tiny_cfg().cache_dir}"])
    assert sorted(r["K"] for r in rows) == [16, 32, 32] and all(r["n_targets"] == 8 * 63 for r in rows)
    assert all(0 < r["e_log_cluster_size"] < math.log(300) for r in rows)


def test_benchmark_rows():
    from ttvq_kernels.bench_vq_logits import bench_shape, table

    rows = bench_shape(96, 16, [8, 200], [1, 3], torch.float32, torch.device("cpu"), repeats=3)
    assert [(r["K"], r["per_token"], r["tokens"]) for r in rows] == [(8, False, 1), (8, True, 1), (8, False, 3), (8, True, 3)]
    assert all(r["kernel"] == "vq_logits" and r["dense_ms"] > 0 and r["vq_ms"] > 0 for r in rows)
    assert rows[0]["head_bits"] == 8 * 16 * 16 + 96 * 3  # fp16 codebook + 3-bit map
    assert rows[0]["param_reduction"] == pytest.approx(1 - 8 * 16 / (96 * 16), abs=1e-5)
    assert table(rows).count("\n") == 1 + len(rows)
