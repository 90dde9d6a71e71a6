"""methods/distill.py on small random Llama models: block-wise MSE distillation lowers the
held-out error and leaves untrained parameters alone, keep-best never ends worse than the
start, end-to-end KL distillation (full or top-k teacher targets) lowers the KL, the streamed
teacher equals the model's own forward, the top-k KL is the full one's lower bound, and the
helpers."""
import copy

import pytest
import torch
from torch import nn

from ttvq_methods.distill import (TeacherTargets, TrainConfig, block_mse, distill_block, distill_model, kl_loss,
                                  split_windows, teacher_logprobs, trainable_fraction)
from ttvq_methods.model_walk import block_kwargs, capture_inputs, run_block

pytestmark = pytest.mark.usefixtures("one_thread")


def small_llama(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=88, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def ids(n=24, seqlen=32, seed=1):
    return torch.randint(0, 64, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_split_windows():
    tr, va = split_windows(20, 0.2, seed=3)
    assert len(va) == 4 and len(tr) == 16
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(20))
    tr2, va2 = split_windows(20, 0.2, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    tr, va = split_windows(1, 0.5)
    assert len(tr) == 1 and len(va) == 0  # always one training window
    assert len(split_windows(10, 0.0)[1]) == 0


def test_block_kwargs_other_batch_size():
    mask = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 4, 4)
    rot = (torch.ones(1, 4, 2), torch.zeros(1, 4, 2))
    kw = {8: {"attention_mask": mask, "position_embeddings": rot, "position_ids": torch.zeros(1, 4)}}
    assert block_kwargs(kw, 8) is kw[8]
    k3 = block_kwargs(kw, 3)
    assert k3["attention_mask"].shape[0] == 3 and k3["position_embeddings"][0].shape[0] == 1
    assert block_kwargs(kw, 12)["attention_mask"].shape[0] == 12


def _noisy_block(model, b=0, scale=0.3, seed=5, only="proj"):
    block = copy.deepcopy(model.model.layers[b])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, m in block.named_modules():
            if isinstance(m, nn.Linear) and only in n:
                m.weight.add_(scale * m.weight.std() * torch.randn(m.weight.shape, generator=g))
    return block


def test_distill_block_lowers_heldout_mse_and_freezes_the_rest():
    model = small_llama()
    inp = capture_inputs(model, ids(40), 8)
    fp_block = model.model.layers[0]
    targets = run_block(fp_block, inp)
    student = _noisy_block(model, only="mlp")
    mlp = [student.mlp.gate_proj.weight, student.mlp.up_proj.weight, student.mlp.down_proj.weight]
    attn_before = student.self_attn.q_proj.weight.detach().clone()
    # Training uses the first 32 windows (4 of them held out inside distill_block); the last 8
    # are never seen and measure generalisation independently.
    train_h, train_t = inp.hidden[:32], targets[:32]
    fresh = torch.arange(32, 40)
    mse_fresh_before = block_mse(student, inp.hidden, targets, inp.kwargs_by_bs, fresh)
    res = distill_block(student, train_h, train_t, inp.kwargs_by_bs, [{"params": mlp, "lr": 1e-3}],
                        TrainConfig(epochs=8, batch_size=4, val_fraction=0.125))
    assert res["n_val"] == 4 and res["n_train"] == 28 and res["steps"] == 8 * 7
    assert res["val_after"] < 0.2 * res["val_before"], res
    assert res["train_after"] < 0.2 * res["train_before"]
    assert block_mse(student, inp.hidden, targets, inp.kwargs_by_bs, fresh) < 0.2 * mse_fresh_before
    assert torch.equal(student.self_attn.q_proj.weight, attn_before)  # not in the groups: untouched
    assert all(p.grad is None for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_keep_best_never_ends_worse():
    model = small_llama()
    inp = capture_inputs(model, ids(16), 8)
    targets = run_block(model.model.layers[0], inp)
    student = _noisy_block(model, scale=0.05)
    before = block_mse(student, inp.hidden, targets, inp.kwargs_by_bs, split_windows(16, 0.25)[1])
    params = [p for p in student.parameters()]
    saved = [p.detach().clone() for p in params]
    res = distill_block(student, inp.hidden, targets, inp.kwargs_by_bs, [{"params": params, "lr": 10.0}],
                        TrainConfig(epochs=2, batch_size=4, val_fraction=0.25))
    assert res["best_epoch"] == 0  # a huge lr ruins every epoch: the start is restored
    assert res["val_after"] == pytest.approx(before)
    assert all(torch.equal(p, s) for p, s in zip(params, saved))


def test_skipping_the_per_epoch_training_loss_changes_nothing_but_the_history():
    """epoch_train_loss=False measures only the held-out loss per epoch: the same steps, the
    same kept state and final losses; the history's training loss is the epoch's step loss."""
    model = small_llama(layers=1)
    inp = capture_inputs(model, ids(24), 8)
    targets = run_block(model.model.layers[0], inp)
    runs = []
    for full in (True, False):
        student = _noisy_block(model)
        tc = TrainConfig(epochs=4, batch_size=4, val_fraction=0.25, epoch_train_loss=full)
        res = distill_block(student, inp.hidden, targets, inp.kwargs_by_bs,
                            [{"params": [p for n, p in student.named_parameters() if "proj" in n], "lr": 3e-3}], tc)
        runs.append((res, {n: p.detach().clone() for n, p in student.named_parameters()}))
    (a, wa), (b, wb) = runs
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert a["best_epoch"] == b["best_epoch"] > 0
    assert [h["val"] for h in a["history"]] == [h["val"] for h in b["history"]]
    assert a["train_after"] == pytest.approx(b["train_after"], rel=1e-6) and a["val_after"] == b["val_after"]
    assert [h["train"] for h in b["history"]] == [h["step_loss"] for h in b["history"]]
    assert [h["train"] for h in a["history"]] != [h["step_loss"] for h in a["history"]]


def test_bf16_autocast_trains_in_bf16_with_fp32_parameters():
    """autocast=bf16: the training forward passes run in bf16 (the linears see bf16 inputs), the
    parameters stay fp32 and the held-out loss still falls; off: fp32 throughout."""
    model = small_llama(layers=1)
    inp = capture_inputs(model, ids(24), 8)
    targets = run_block(model.model.layers[0], inp)
    out = {}
    for mode in ("bf16", "off"):
        student = _noisy_block(model)
        seen = set()
        hook = student.mlp.down_proj.register_forward_hook(lambda m, a, y: seen.add(y.dtype) if torch.is_grad_enabled() else None)
        params = [p for n, p in student.named_parameters() if "proj" in n]
        res = distill_block(student, inp.hidden, targets, inp.kwargs_by_bs, [{"params": params, "lr": 3e-3}],
                            TrainConfig(epochs=3, batch_size=4, val_fraction=0.25, autocast=mode))
        hook.remove()
        assert res["val_after"] < 0.7 * res["val_before"], (mode, res)
        assert all(p.dtype == torch.float32 for p in student.parameters())
        out[mode] = (seen, {n: p.detach().clone() for n, p in student.named_parameters()})
    assert out["bf16"][0] == {torch.bfloat16} and out["off"][0] == {torch.float32}
    assert any(not torch.equal(out["bf16"][1][n], out["off"][1][n]) for n in out["off"][1])


def test_on_step_hook_called_every_step():
    model = small_llama(layers=1)
    inp = capture_inputs(model, ids(8), 8)
    targets = run_block(model.model.layers[0], inp)
    student = _noisy_block(model)
    steps = []
    distill_block(student, inp.hidden, targets, inp.kwargs_by_bs,
                  [{"params": [student.mlp.up_proj.weight], "lr": 1e-3}],
                  TrainConfig(epochs=3, batch_size=3, val_fraction=0.0), on_step=steps.append)
    assert steps == list(range(1, 3 * 3 + 1))


@pytest.mark.parametrize("targets", ["full", "top8"])
def test_distill_model_lowers_kl(targets):
    teacher = small_llama(seed=0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "norm" in n:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    norms = [p for n, p in student.named_parameters() if "norm" in n]
    emb = student.model.embed_tokens.weight.detach().clone()
    x = ids(20, 32)
    res = distill_model(student, x, [{"params": norms, "lr": 3e-2}], TrainConfig(epochs=6, batch_size=4, val_fraction=0.2),
                        teacher=teacher, max_cache_mb=1e9 if targets == "full" else 0, topk=8)
    assert res["teacher_targets"] == targets
    assert res["val_after"] < 0.5 * res["val_before"], res
    assert torch.equal(student.model.embed_tokens.weight, emb)
    frac = trainable_fraction(norms, sum(p.numel() for p in teacher.parameters()))
    assert frac["trainable"] == sum(p.numel() for p in norms) and 0 < frac["fraction"] < 0.05


def test_kl_loss_zero_for_same_model():
    m = small_llama()
    x = ids(4, 16)
    lp = teacher_logprobs(m, x, 2)
    assert lp.logprobs.dtype == torch.float16 and lp.indices is None
    with torch.no_grad():
        assert float(kl_loss(m(input_ids=x).logits, lp)) == pytest.approx(0.0, abs=1e-4)


def test_streamed_teacher_equals_the_models_forward():
    """Block by block (what keeps a big teacher off the device whole) is the model's forward."""
    m = small_llama(layers=3)
    x = ids(6, 16)
    with torch.no_grad():
        ref = torch.log_softmax(m(input_ids=x).logits.float(), -1)
    full = teacher_logprobs(m, x, 4, torch.float32)
    assert (full.logprobs - ref).abs().max() < 1e-5
    top = teacher_logprobs(m, x, 4, topk=5)
    assert top.logprobs.shape == (6, 16, 5) and top.indices.dtype == torch.int32
    assert torch.equal(top.indices.long(), ref.topk(5, -1).indices)
    assert (top.logprobs - ref.topk(5, -1).values).abs().max() < 1e-5


def test_topk_kl_is_the_full_kl_coarsened():
    """KL over the teacher's top k plus one bucket for the rest: equal to the full KL when k
    is the vocabulary, a lower bound below it, zero for the teacher itself, finite gradients."""
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = 2 * torch.randn(3, 7, 64, generator=g), 2 * torch.randn(3, 7, 64, generator=g)
    t_lp = torch.log_softmax(t_logits, -1)
    full = float(kl_loss(s_logits, t_lp))

    def top(k):
        v, ix = t_lp.topk(k, -1)
        return TeacherTargets(v, ix.int())

    assert float(kl_loss(s_logits, top(64))) == pytest.approx(full, rel=1e-5)
    coarse = [float(kl_loss(s_logits, top(k))) for k in (1, 4, 16, 48)]
    assert all(0 <= c <= full + 1e-6 for c in coarse) and coarse[-1] > 0.8 * full, (coarse, full)
    assert float(kl_loss(t_logits, top(8))) == pytest.approx(0.0, abs=1e-5)
    s = s_logits.clone().requires_grad_(True)
    kl_loss(s, top(8)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_sample_windows_seeded_from_bos():
    from ttvq_methods.teacher import sample_windows

    m = small_llama()
    a = sample_windows(m, 5, 12, bos_id=1, seed=3, batch_size=2)
    b = sample_windows(m, 5, 12, bos_id=1, seed=3, batch_size=2)
    assert a.shape == (5, 12) and torch.equal(a, b) and (a[:, 0] == 1).all()
    assert not torch.equal(a, sample_windows(m, 5, 12, bos_id=1, seed=4, batch_size=2))
