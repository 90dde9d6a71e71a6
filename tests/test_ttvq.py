"""TTVQ: the VQ layer's trainable mode (straight-through gradients checked by hand, index
updates, exact stored form without the latent) and the method end to end on the tiny model
(frozen codebook stays bit-identical, frozen indices never change, block-wise distillation
lowers the held-out block MSE, the checkpoint reproduces the trained model exactly, config
errors)."""
import copy
import math

import pytest
import torch
from torch import nn

from ttvq_bench.errors import ConfigError
from ttvq_methods.base import make_config
from ttvq_methods.checkpoint import load_module_state, save_module_state
from ttvq_methods.model_walk import modules_of
from ttvq_methods.registry import METHODS
from ttvq_methods.ttvq import TTVQ, TTVQConfig
from ttvq_methods.vq.layer import VQLinear, stored_mode, train_mode

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_layer(norm="tensor"):
    """in=2, out=4, d=2, K=3, vectors along the output dim: column j = s·[C[I[j,0]], C[I[j,1]]]."""
    q = VQLinear(2, 4, vector_len=2, codebook_sizes=3, orientation="out", norm=norm)
    q.codebook0.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 0.5]]).half())
    q.set_codes([torch.tensor([[0, 1], [2, 0]])])
    if norm == "tensor":
        q.set_norm(torch.tensor([2.0]))
    return q


def test_straight_through_gradients_by_hand():
    q = hand_layer()
    s = 2.0
    W_hat = s * torch.tensor([[1.0, 0.0], [2.0, 0.5], [3.0, 1.0], [-1.0, 2.0]])
    assert torch.equal(q.dequantize(), W_hat)
    W_fp = W_hat + 0.1  # the latent starts at the full-precision weight, normalised: W_fp / s
    t = q.make_trainable(W_fp).train()
    assert torch.allclose(t.latent, W_fp.T / s)
    x = torch.tensor([[1.0, -2.0]])
    g = torch.tensor([1.0, 2.0, -1.0, 0.5])
    y = t(x)
    assert torch.equal(y[0], W_hat @ x[0])  # the forward value is Ŵ, never the latent
    (y[0] * g).sum().backward()
    # dL/dŴ[o, j] = g[o] x[j]; the latent (line j = input column j, normalised) gets s·g·x[j]
    assert torch.allclose(t.latent.grad, torch.tensor([[2.0, 4.0, -2.0, 1.0], [-4.0, -8.0, 4.0, -2.0]]))
    # codeword k: the sum over its vectors: C0 holds (col0, rows 0-1) and (col1, rows 2-3)
    assert torch.allclose(t.codebook0.grad, torch.tensor([[2.0 + 4.0, 4.0 - 2.0], [-2.0, 1.0], [-4.0, -8.0]]))
    # dL/ds = Σ g[o] x[j] C[I][o, j] = (1 + 4 - 3 - 0.5) + (0 - 2 + 2 - 2)
    assert torch.allclose(t.norm_scale.grad, torch.tensor([-0.5]))


def test_index_update_nearest_fraction_and_padding():
    q = VQLinear(3, 2, vector_len=2, codebook_sizes=4, orientation="out")
    q.codebook0.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]).half())
    q.set_codes([torch.full((3, 1), 3)])
    lat = torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.2, 1.1]])  # lines: nearest 1, 0, 2
    t = q.make_trainable(lat.T)
    codes = t.int_codes()["codes0"]
    r = t.update_indices(fraction=0.2)  # at most ceil(0.6) = 1 vector: the largest gain (vector 1)
    assert r == {"n": 3, "changed": 1} and codes.view(-1).tolist() == [3, 0, 3]
    assert t.update_indices(1.0)["changed"] == 2 and codes.view(-1).tolist() == [1, 0, 2]
    assert t.update_indices(1.0)["changed"] == 0
    # a padded entry never decides: line length 3, d = 2 -> the second vector is [x, pad]
    p = VQLinear(1, 3, vector_len=2, codebook_sizes=2, orientation="out")
    p.codebook0.copy_(torch.tensor([[0.0, 0.0], [1.0, 100.0]]).half())
    p.set_codes([torch.zeros(1, 2, dtype=torch.long)])
    t = p.make_trainable(torch.tensor([[0.0], [0.0], [0.9]]))
    t.update_indices()
    assert t.int_codes()["codes0"].tolist() == [[0, 1]]


def test_residual_update_is_greedy_and_never_worse():
    """M = 2: nearest main codeword, then the nearest residual codeword to what is left."""
    q = VQLinear(2, 2, vector_len=2, codebook_sizes=[2, 2], orientation="out")
    q.codebook0.copy_(torch.tensor([[0.0, 0.0], [2.0, 2.0]]).half())
    q.codebook1.copy_(torch.tensor([[0.0, 0.0], [0.5, -0.5]]).half())
    q.set_codes([torch.zeros(2, 1, dtype=torch.long)] * 2)
    t = q.make_trainable(torch.tensor([[2.4, 0.1], [1.6, -0.1]]))  # lines [2.4, 1.6] and [0.1, -0.1]
    assert t.update_indices() == {"n": 2, "changed": 1}
    assert t.int_codes()["codes0"].view(-1).tolist() == [1, 0] and t.int_codes()["codes1"].view(-1).tolist() == [1, 0]


def test_gradient_mode_latent_has_no_memory():
    q = hand_layer()
    t = copy.deepcopy(q).make_trainable(torch.randn(4, 2))
    t.reset_latent()
    assert torch.equal(t.latent, (q.dequantize() / 2.0).T)
    assert hand_layer().make_trainable(None).update_indices() == {"n": 0, "changed": 0}


def random_vq(in_f=8, out=12, d=4, K=16, norm="line", norm_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = VQLinear(in_f, out, vector_len=d, codebook_sizes=K, orientation="out", norm=norm, norm_bias=norm_bias)
    q.codebook0.copy_(torch.randn(K, d, generator=g).half())
    q.set_codes([torch.randint(0, K, (q.n_reg, q.nv), generator=g)])
    q.set_norm(torch.rand(in_f, generator=g) + 0.5, torch.randn(in_f, generator=g) * 0.1)
    return q


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_stored_form_is_exact_and_has_no_latent(lora_rank, tmp_path):
    q = random_vq()
    t = q.make_trainable(q.dequantize() + 0.05 * torch.randn(12, 8), lora_rank=lora_rank).train()
    opt = torch.optim.Adam(t.parameters(), lr=1e-2)
    x = torch.randn(5, 8)
    for _ in range(3):
        opt.zero_grad()
        t(x).pow(2).sum().backward()
        opt.step()
        t.update_indices()
    t.round_to_storage()
    t.eval()
    y = t(x)
    stored = t.make_stored()
    assert stored is q and not q.trainable and next(q.parameters(), None) is None
    assert not any("latent" in k for k in stored.state_dict()) and stored.lora_rank == lora_rank
    assert torch.equal(stored(x), y)
    holder = nn.Sequential(stored)
    save_module_state(holder, tmp_path / "l.safetensors")
    fresh = nn.Sequential(nn.Linear(8, 12, bias=False))
    load_module_state(fresh, tmp_path / "l.safetensors")
    assert torch.equal(fresh(x), y)
    assert fresh[0].stored_bits() == stored.stored_bits()
    if lora_rank:  # the adapter is stored fp16 and counted
        assert stored.stored_bits() == random_vq().stored_bits() + lora_rank * (8 + 12) * 16


def test_shared_codebook_is_one_parameter_and_one_stored_tensor():
    def pair():
        a, b = random_vq(seed=1), random_vq(seed=2)
        b.share("codebook0", a.codebook0, "model")
        a.shared["codebook0"] = "model"
        return a, b

    a, b = pair()
    train_mode({"a": a, "b": b})
    assert isinstance(a.codebook0, nn.Parameter) and a.codebook0 is b.codebook0
    x = torch.randn(3, 8)
    (a.train()(x).sum() + b.train()(x).sum()).backward()
    alone = pair()[0].make_trainable(None).train()
    alone(x).sum().backward()
    assert not torch.allclose(a.codebook0.grad, alone.codebook0.grad)  # the gradient sums both layers
    stored_mode([a, b])
    assert a.codebook0 is b.codebook0 and a.shared == {"codebook0": "model"}
    # unchanged, a shared codebook stays the very tensor other (untrained) holders have
    c, d = pair()
    held = c.codebook0
    train_mode({"c": c})
    stored_mode([c])
    assert c.codebook0 is held and d.codebook0 is held


def test_config_errors():
    cls = METHODS.get("ttvq")
    with pytest.raises(ConfigError, match="unknown method 'quip'"):
        cls(TTVQConfig(init="quip"), 2)
    with pytest.raises(ConfigError, match="not a VQ method"):
        cls(TTVQConfig(init="gptq"), 2)
    with pytest.raises(ConfigError, match="init_args.vptq.codebook_scope"):
        cls(TTVQConfig(init_args={"vptq": {"codebook_scope": "everything"}}), 2)
    with pytest.raises(ConfigError, match="index_update"):
        make_config(TTVQConfig, {"index_update": "sometimes"}, "ttvq")
    for bad in (dict(update_fraction=0.0), dict(update_period=0), dict(block_epochs=-1), dict(peft_batch_size=0),
                dict(peft_update_fraction=1.5), dict(peft_update_period=-1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            cls(TTVQConfig(**bad), 2)
    init = TTVQ(TTVQConfig(), 2).init
    assert (init.cfg.codebook_scope, init.cfg.norm, init.cfg.norm_bias) == ("model", "line", False)


def test_peft_index_updates_default_to_stage_1s_and_take_their_own():
    t = TTVQ(TTVQConfig(update_period=10, update_fraction=0.5), 2)
    idx = t._index_updates({}, True, t.cfg.peft_update_period, t.cfg.peft_update_fraction)
    assert (idx.period, idx.fraction) == (10, 0.5)  # 0: as in stage 1
    t = TTVQ(TTVQConfig(update_period=10, update_fraction=0.5, peft_update_period=1, peft_update_fraction=0.01), 2)
    idx = t._index_updates({}, True, t.cfg.peft_update_period, t.cfg.peft_update_fraction)
    assert (idx.period, idx.fraction) == (1, 0.01)  # PV-tuning's rule


def test_yaml_composes(compose):
    cfg = compose(["method=ttvq", "bits=2", "method.init_args.vptq.vector_len=3"])
    assert cfg.method.name == "ttvq" and cfg.method.index_update == "latent" and cfg.method.init == "vptq"
    from omegaconf import OmegaConf

    assert TTVQ(OmegaConf.to_object(cfg.method), 2).init.cfg.vector_len == 3
    abl = compose(["experiment=ttvq_ablation"])
    assert abl.method.name == "ttvq" and abl.eval.ppl.seqlen == 256


# -- the method on the tiny model -------------------------------------------------------------------
FAST = ["bits=2", "+method.init_args.vptq.kmeans_iters=10", "+method.init_args.kmeans.kmeans_iters=10", "method.block_epochs=3", "method.peft_epochs=2",
        "method.block_batch_size=2", "method.peft_batch_size=2", "method.update_period=1",
        "method.val_fraction=0.25", "method.lr_latent=1e-2", "method.lr_codebook=1e-3",
        "method.peft_lr_codebook=1e-3", "method.peft_lr_norm=1e-3"]


@pytest.fixture
def tiny_ttvq(tiny_cfg):
    from omegaconf import OmegaConf

    from conftest import quantize_recording

    def run(*overrides):
        cfg = tiny_cfg("method=ttvq", *FAST, *overrides)
        method = TTVQ(OmegaConf.to_object(cfg.method), cfg.bits)
        lm, calib, init = quantize_recording(cfg, method)
        return lm, calib, method, init, modules_of(lm.model, VQLinear)

    return run


@pytest.mark.parametrize("init_method", ["kmeans", "vptq"])
def test_frozen_codebook_is_bit_identical(tiny_ttvq, init_method):
    lm, _, method, init, final = tiny_ttvq("method.codebook=frozen", f"method.init={init_method}")
    assert len(final) == 14 and set(final) == set(init)
    for n, m in final.items():
        assert torch.equal(m.codebook0, init[n]["codebook0"]), n
    rep = method.report()
    assert rep["peft"]["steps"] > 0  # PEFT ran (scales, norms) with the codebook frozen
    if init_method == "kmeans":
        # On this fixture training beats the k-means init on held-out windows, so the kept state
        # is a trained one and the scales moved: the frozen codebook is not a frozen model.
        # (From the VPTQ init every stage's keep-best keeps the init: nothing to check there.)
        assert rep["peft"]["best_epoch"] > 0 or any(b["best_epoch"] > 0 for b in rep["blocks"].values())
        assert any(not torch.equal(m.norm_scale, init[n]["norm_scale"]) for n, m in final.items())


def test_frozen_indices_never_change(tiny_ttvq):
    _, _, method, init, final = tiny_ttvq("method.index_update=frozen")
    for n, m in final.items():
        assert torch.equal(m.codes0, init[n]["codes0"]), n
    assert all(b["index_updates"] == 0 for b in method.report()["blocks"].values())


def test_latent_updates_move_indices_and_blockwise_lowers_heldout_mse(tiny_ttvq):
    _, _, method, init, final = tiny_ttvq("method.init=kmeans")
    rep = method.report()
    assert sum(not torch.equal(m.codes0, init[n]["codes0"]) for n, m in final.items()) > 0
    for b, r in rep["blocks"].items():
        assert r["index_updates"] > 0 and r["final_index_change"] > 0
        assert r["val_mse_after"] < r["val_mse_before"], (b, r)  # held-out calibration windows
    peft = rep["peft"]
    assert peft["val_kl_after"] <= peft["val_kl_before"] and 0 < peft["trainable_fraction"] < 0.1


def test_checkpoint_has_no_latent_and_reproduces_outputs(tiny_ttvq, tiny_cfg, tmp_path):
    from ttvq_bench.models import load_model
    from ttvq_bench.record.cache import Cache
    from ttvq_methods.checkpoint import round_to_storage

    lm, calib, _, _, final = tiny_ttvq("method.lora_rank=1")
    assert all(m.lora_rank == 1 and not m.trainable for m in final.values())
    assert next(lm.model.parameters()).requires_grad is False and not any("lora" in n for n, _ in lm.model.named_parameters())
    round_to_storage(lm.model, "float16")
    with torch.no_grad():
        ref = lm.model(input_ids=calib[:2]).logits
    save_module_state(lm.model, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not any("latent" in k for k in keys)
    fresh = load_model(tiny_cfg().model, Cache(tiny_cfg().cache_dir), False)
    load_module_state(fresh.model, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=calib[:2]).logits, ref)


def test_run_job_records_report_and_reloads(tiny_cfg, tmp_path):
    from ttvq_bench.run import run_job

    rec = run_job(tiny_cfg("method=ttvq", *FAST, "method.init=kmeans"), tmp_path / "a")
    assert rec["status"] == "ok" and 2.0 < rec["bpw"] < 3.5
    rep = rec["quantize"]["method_report"]
    assert rep["init"] == "kmeans" and set(rep["blocks"]) == {0, 1} and rep["peft"]["trainable_fraction"] > 0
    again = run_job(tiny_cfg("method=ttvq", *FAST, "method.init=kmeans", f"checkpoint={rec['quantize']['checkpoint']}"),
                    tmp_path / "b")
    assert again["bpw"] == rec["bpw"] and again["ppl"] == rec["ppl"]
    assert math.isfinite(rec["ppl"]["default"])


@pytest.mark.parametrize("norm", ["line", "tensor"])
def test_compensated_latent_reproduces_the_init_codes(norm):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 12, generator=g) @ (torch.eye(12) + 0.5 * torch.randn(12, 12, generator=g))
    H = X.T @ X / 512
    lin = nn.Linear(12, 16, bias=False)
    lin.weight.data = torch.randn(16, 12, generator=g)
    shape = dict(codebook_scope="layer", vector_len=4, codebook_size=16, kmeans_iters=20)
    holder = nn.Module()  # a "model" whose one block holds the layer: what the shape is resolved on
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleList([nn.ModuleDict({"l": lin})])
    m = TTVQ(TTVQConfig(init_args={"vptq": dict(shape, norm=norm)}), 2)
    m.init.resolve_shape(holder)
    q = m.init.quantize_layer("l", lin, H)
    # GPTQ-style assignment: the codes are the nearest codewords of the error-compensated
    # weight, not of W itself.
    rounded = m.init.rounded_weight("l", lin.weight, H, q)
    assert copy.deepcopy(q).make_trainable(rounded).update_indices()["changed"] == 0
    assert copy.deepcopy(q).make_trainable(lin.weight).update_indices()["changed"] > 0
    k = TTVQ(TTVQConfig(init="kmeans", init_args={"kmeans": shape}), 2)
    k.init.resolve_shape(holder)
    assert torch.equal(k.init.rounded_weight("l", lin.weight, H, q), lin.weight)


def test_synthetic_windows_join_both_stages(tiny_ttvq):
    _, calib, method, _, _ = tiny_ttvq("method.synthetic_windows=4", "method.init=kmeans")
    rep = method.report()
    assert rep["synthetic"]["windows"] == 4
    assert rep["peft"]["n_train_windows"] + rep["peft"]["n_val_windows"] == len(calib) + 4
    assert all(r["val_mse_after"] < r["val_mse_before"] for r in rep["blocks"].values())


@pytest.mark.parametrize("start", ["block", "quantized"])
def test_peft_latents_start_where_asked(tiny_ttvq, monkeypatch, start):
    """peft_latent: stage 2's latents start at the block stage's trained latents (away from Ŵ)
    or at Ŵ itself (PV-tuning's start)."""
    import ttvq_methods.ttvq as ttvq_module

    gaps, real = [], ttvq_module.distill_model

    def spy(model, *a, **k):  # the latents as stage 2's training loop receives them
        gaps.extend(float((q.latent_weight() - q.dequantize().detach()).abs().max()) for q in modules_of(model, VQLinear).values())
        return real(model, *a, **k)

    monkeypatch.setattr(ttvq_module, "distill_model", spy)
    tiny_ttvq("method.init=kmeans", "method.peft_latent=true", f"method.peft_latent_start={start}")
    assert len(gaps) == 14
    assert (min(gaps) > 1e-3) if start == "block" else (max(gaps) < 1e-6), gaps
