"""VPTQ on real layers of stories260K with their real Hessians: second-order assignment beats
plain k-means VQ with the same codebook, the layer stores exactly what was computed, bpw by
hand with residual and outliers, determinism; then the method end to end on the tiny model
(shared codebook, resume, checkpoint reload)."""
import math

import pytest
import torch

from conftest import DATA
from ttvq_bench.errors import ConfigError
from ttvq_methods.checkpoint import load_module_state, save_module_state
from ttvq_methods.base import make_config
from ttvq_methods.registry import METHODS
from ttvq_methods.second_order import layer_proxy_loss
from ttvq_methods.vq.budget import VQSpec
from ttvq_methods.vq.codebook import fit_codebook, vector_weights
from ttvq_methods.vq.layer import to_vectors
from ttvq_methods.vptq import VPTQConfig, prep_layer, vptq_quantize

# Small tensors: one thread avoids spin-waiting against other processes on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def real_block():
    """Block 0 of stories260K: weights and true input Hessians on 16 TinyStories windows."""
    ckpt, tok, text = DATA / "stories260K" / "stories260K.bin", DATA / "stories260K" / "tok512.model", DATA / "tinystories" / "tinystories_val.txt"
    if not (ckpt.is_file() and tok.is_file() and text.is_file()):
        pytest.skip(f"shared data not found under {DATA}")
    from ttvq_bench.models.llama2c import load_llama2c
    from ttvq_methods.model_walk import capture_inputs, linears
    from ttvq_methods.second_order import collect_hessians

    lm = load_llama2c(ckpt, tok)
    ids = lm.tokenizer.encode(text.read_text(encoding="utf-8")[:60000])
    x = torch.tensor([[lm.tokenizer.bos_id] + ids[i * 127 : (i + 1) * 127] for i in range(16)])
    block = lm.model.model.layers[0]
    H = collect_hessians(block, list(linears(block)), capture_inputs(lm.model, x, 8))
    return {n: (m.weight.data.clone(), H[n]) for n, m in linears(block).items()}


def layer_codebook(W, H, spec, cfg):
    """The Hessian-weighted k-means codebook vptq_quantize would fit for this layer."""
    p = prep_layer(W, H.diagonal(), cfg, spec)
    x, mask = to_vectors(p.Wn[:, p.regular].T, spec.vector_len)
    w = vector_weights(p.importance[p.regular], W.shape[0], spec.vector_len, mask)
    return fit_codebook(x, w, spec.codebook_size, iters=cfg.kmeans_iters, tol=cfg.kmeans_tol, init="kmeanspp", seed=0)[0]


@pytest.mark.parametrize("name,d", [("mlp.gate_proj", 8), ("mlp.down_proj", 4), ("self_attn.q_proj", 4)])
def test_second_order_beats_plain_kmeans_same_codebook(real_block, name, d):
    W, H = real_block[name]
    spec = VQSpec(d, 64)
    cfg = VPTQConfig(norm="none")
    C = layer_codebook(W, H, spec, cfg)
    vptq = vptq_quantize(W, H, spec, cfg, books={"codebook0": C})
    plain = vptq_quantize(W, H, spec, VPTQConfig(norm="none", second_order=False), books={"codebook0": C})
    assert torch.equal(vptq.layer.codebook0, plain.layer.codebook0)
    l_vptq, l_plain = layer_proxy_loss(W, vptq.Wq, H), layer_proxy_loss(W, plain.Wq, H)
    assert l_vptq < 0.9 * l_plain, (l_vptq, l_plain)


def test_residual_pass_and_outliers_help(real_block):
    W, H = real_block["mlp.gate_proj"]
    cfg = VPTQConfig(codebook_scope="layer")
    base = vptq_quantize(W, H, VQSpec(4, 64), cfg)
    res = vptq_quantize(W, H, VQSpec(4, 64, 16), cfg)
    assert res.stats["proxy"] < 0.8 * res.stats["proxy_pass1"]  # pass 2 with the residual codebook
    assert res.stats["proxy_pass1"] == pytest.approx(base.stats["proxy"], rel=1e-6)  # pass 1 = no residual
    outl = vptq_quantize(W, H, VQSpec(4, 64, 0, 5.0, 2, 256), cfg)
    assert outl.stats["proxy"] < base.stats["proxy"]


def test_stores_exactly_what_it_computed(real_block):
    W, H = real_block["mlp.gate_proj"]  # 172 rows: with d=8 the last vector of each column is padded
    for cfg in (VPTQConfig(codebook_scope="layer"), VPTQConfig(codebook_scope="layer", norm="tensor", norm_bias=False), VPTQConfig(codebook_scope="layer", norm="none", perm=False)):
        r = vptq_quantize(W, H, VQSpec(8, 64, 16, 3.0, 2, 32), cfg)
        p = prep_layer(W, H.diagonal(), cfg, VQSpec(8, 64, 16, 3.0, 2, 32))
        Wq = r.Qn if p.scale is None else (r.Qn * p.scale + (p.bias if p.bias is not None else 0))
        assert torch.equal(r.layer.dequantize(), r.Wq)
        assert torch.equal(r.Wq, Wq)
        assert r.stats["proxy"] == pytest.approx(layer_proxy_loss(W, r.Wq, H), rel=1e-3)


def test_bpw_by_hand_with_residual_and_outliers(real_block, tmp_path):
    W, H = real_block["mlp.gate_proj"]  # (172, 64)
    r = vptq_quantize(W, H, VQSpec(8, 256, 16, 3.0, 2, 256), VPTQConfig(codebook_scope="layer"))
    # 3% of 64 columns -> 2 outlier columns; 62 regular columns of ceil(172/8) = 22 vectors
    # (176 rows, 4 of them padding); outlier columns: 86 vectors of 2.
    bits = (62 * 22 * 8  # main codes, 8 bits
            + 62 * 22 * 4  # residual codes, 4 bits
            + 256 * 8 * 16 + 16 * 8 * 16  # main + residual codebooks, fp16
            + 16  # 2 outlier column indices x 6 bits = 12 bits -> 2 bytes
            + 256 * 2 * 16 + 2 * 86 * 8  # outlier codebook + codes
            + 64 * 16 * 2)  # per-column scale + bias, fp16
    assert r.layer.stored_bits() == bits
    assert r.layer.bpw() == pytest.approx(bits / (172 * 64))
    assert bits == 62816  # 5.71 bpw: a 256-entry codebook costs 3 bpw on 11k weights
    # ... and the checkpoint holds exactly those bytes, reloading bit-exactly.
    holder = torch.nn.Sequential(r.layer)
    save_module_state(holder, tmp_path / "l.safetensors")
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 172, bias=False))
    load_module_state(fresh, tmp_path / "l.safetensors")
    assert torch.equal(fresh[0].dequantize(), r.Wq)
    assert fresh[0].stored_bits() == bits


def test_same_seed_same_indices(real_block):
    W, H = real_block["self_attn.q_proj"]
    spec = VQSpec(4, 64, 16)
    a = vptq_quantize(W, H, spec, VPTQConfig(codebook_scope="layer", kmeans_seed=3))
    b = vptq_quantize(W, H, spec, VPTQConfig(codebook_scope="layer", kmeans_seed=3))
    c = vptq_quantize(W, H, spec, VPTQConfig(codebook_scope="layer", kmeans_seed=4))
    for k in ("codes0", "codes1", "codebook0", "codebook1"):
        assert torch.equal(a.layer.state_dict()[k], b.layer.state_dict()[k]), k
    assert not torch.equal(a.layer.codebook0, c.layer.codebook0)


def test_config_errors():
    with pytest.raises(ConfigError, match="codebook_scope"):
        make_config(VPTQConfig, {"codebook_scope": "everything"}, "vptq")
    with pytest.raises(ConfigError, match="outlier_percent"):
        METHODS.get("vptq")(VPTQConfig(outlier_percent=100.0), 2)


def test_yaml_composes(compose):
    cfg = compose(["method=vptq", "bits=2", "method.codebook_scope=model"])
    assert cfg.method.name == "vptq" and cfg.method.codebook_scope == "model"
    assert cfg.method.norm == "scope" and cfg.method.second_order is True
    abl = compose(["experiment=vptq_ablation"])
    assert abl.method.name == "vptq" and abl.method.codebook_scope == "model"


VQ_TINY = ("method=vptq", "bits=2", "method.codebook_scope=model", "method.norm=tensor", "method.residual=true",
           "method.outlier_percent=5", "method.kmeans_iters=20", "method.vector_len=6", "method.codebook_size=64",
           "method.res_codebook_size=64")


def test_end_to_end_shared_codebook_resume_and_reload(tiny_cfg, tmp_path, monkeypatch):
    from ttvq_bench.run import run_job
    from ttvq_methods import vptq

    real = vptq.VPTQ.quantize_layer

    def dies_in_block1(self, name, layer, H):
        if ".layers.1." in name:
            raise KeyboardInterrupt
        return real(self, name, layer, H)

    monkeypatch.setattr(vptq.VPTQ, "quantize_layer", dies_in_block1)
    with pytest.raises(KeyboardInterrupt):
        run_job(tiny_cfg(*VQ_TINY), tmp_path / "a")
    monkeypatch.setattr(vptq.VPTQ, "quantize_layer", real)
    resumed = run_job(tiny_cfg(*VQ_TINY), tmp_path / "b")
    assert resumed["status"] == "ok" and resumed["quantize"]["resumed_blocks"] == 1
    clean = run_job(tiny_cfg(*VQ_TINY, "cache=false", "force=true"), tmp_path / "c")
    # The model-wide codebook is stored and counted once, resumed or not.
    assert resumed["bpw"] == clean["bpw"] and resumed["ppl"] == clean["ppl"]
    by = clean["linear_bits_by_buffer"]
    assert by["codebook0"] == 64 * 6 * 16 and by["codebook1"] == 64 * 6 * 16  # table: (6, 64, 64)
    assert by["outlier_codebook"] == 256 * 2 * 16
    assert 2.0 < clean["bpw"] < 3.5
    again = run_job(tiny_cfg(*VQ_TINY, f"checkpoint={resumed['quantize']['checkpoint']}"), tmp_path / "d")
    assert again["bpw"] == resumed["bpw"] and again["ppl"] == resumed["ppl"]


def test_finetune_never_hurts_block(tiny_cfg, tmp_path):
    from ttvq_bench.run import run_job

    base = ("method=vptq", "bits=2", "method.codebook_scope=block", "method.norm=tensor", "method.kmeans_iters=20")
    plain = run_job(tiny_cfg(*base), tmp_path / "p")
    tuned = run_job(tiny_cfg(*base, "method.finetune=true", "method.ft_epochs=3", "method.ft_lr=1e-3"), tmp_path / "t")
    assert tuned["bpw"] == plain["bpw"]
    assert tuned["ppl"]["default"] < plain["ppl"]["default"] * 1.05
