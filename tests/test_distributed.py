"""Data-parallel distillation (methods/distill.py) on CPU: two gloo processes give what one
process gives, within floating-point noise, for the block-wise and the end-to-end loop; and a
whole job under torchrun (ttvq_bench/distributed.py): rank 0 alone writes, one record."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, TINY, cache_with_tiny_model
from ttvq_bench.record.results import read_runs
from ttvq_methods.distill import TrainConfig, distill_block, distill_model
from ttvq_methods.model_walk import capture_inputs, decoder_layers, run_block

TC = TrainConfig(epochs=2, batch_size=4, val_fraction=0.25, grad_clip=1.0)


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                      num_hidden_layers=1, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _train(kind: str) -> dict[str, torch.Tensor]:
    """One training stage on a perturbed copy of a tiny model; the trained weights."""
    model = _model()
    ids = torch.randint(0, 64, (10, 16), generator=torch.Generator().manual_seed(1))
    teacher = _model()
    block = decoder_layers(model)[0]
    with torch.no_grad():  # the student starts away from the teacher
        for p in block.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    params = [{"params": [p for n, p in block.named_parameters() if "proj" in n], "lr": 1e-3}]
    if kind == "block":
        inputs = capture_inputs(teacher, ids, 4)
        targets = run_block(decoder_layers(teacher)[0], inputs)
        distill_block(block, inputs.hidden, targets, inputs.kwargs_by_bs, params, TC)
    else:
        distill_model(model, ids, params, TC, teacher=teacher)
    return {n: p.detach().clone() for n, p in block.named_parameters()}


def _worker(rank: int, world: int, store: str, kind: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        weights = _train(kind)
        torch.save(weights, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _two_processes(tmp_path, kind: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{kind}.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / f"store_{kind}"), kind, str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0])  # one state in every process
    return ranks[0]


def _compare(one: dict, two: dict) -> float:
    """The largest difference between the two runs' updates, relative to the update (per
    tensor, in norm: Adam turns a last-bit gradient difference of a near-zero gradient entry
    into a visible step difference of that one entry, so a max-entry ratio measures Adam, not
    the reduction)."""
    start = _start_weights()
    worst = 0.0
    for n in one:
        moved = (one[n] - start[n]).norm()
        if moved > 0:  # the stage changed this tensor: the two runs must change it alike
            worst = max(worst, float((one[n] - two[n]).norm() / moved))
    return worst


def _start_weights() -> dict:
    model = _model()
    block = decoder_layers(model)[0]
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return {n: p.detach().clone() for n, p in block.named_parameters()}


def test_block_distillation_two_processes_match_one(tmp_path, one_thread):
    one = _train("block")
    two = _two_processes(tmp_path, "block")
    assert _compare(one, two) < 1e-4, _compare(one, two)


def test_end_to_end_distillation_two_processes_match_one(tmp_path, one_thread):
    one = _train("e2e")
    two = _two_processes(tmp_path, "e2e")
    assert _compare(one, two) < 1e-4, _compare(one, two)


# TTVQ small enough for seconds per job, from a k-means init that both stages improve on.
TTVQ = ["method=ttvq", "bits=2", "method.init=kmeans", "+method.init_args.kmeans.kmeans_iters=10", "method.block_epochs=2",
        "method.peft_epochs=2", "method.block_batch_size=4", "method.peft_batch_size=4", "method.val_fraction=0.25"]


TORCHRUN2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(tmp_path, cache, name: str, launcher: list[str], method: list[str], env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "-m", "ttvq_bench", *TINY, *method, f"cache_dir={cache}", "threads=1",
           f"results_dir={tmp_path / name}", f"hydra.run.dir={tmp_path / name / 'run'}", "logger.progress=false"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


def _job(tmp_path, tiny_cache, name: str, launcher: list[str], method: list[str] = TTVQ, cache=None):
    p = _run(tmp_path, cache or cache_with_tiny_model(tiny_cache, tmp_path / f"cache_{name}"), name, launcher, method)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return read_runs(tmp_path / name)


def test_torchrun_job_two_processes_match_one(tmp_path, tiny_cache):
    """`torchrun --nproc_per_node 2 -m ttvq_bench ...` on CPU (gloo): one ok record, written by
    rank 0, naming the group; the same checkpoint key and, within noise, the same figures as
    one process (the minibatch gradients are summed in another order)."""
    one = _job(tmp_path, tiny_cache, "one", [])
    two = _job(tmp_path, tiny_cache, "two", TORCHRUN2)
    assert [r["status"] for r in one] == ["ok"] and [r["status"] for r in two] == ["ok"]
    a, b = one[0], two[0]
    assert b["device"]["distributed"]["world_size"] == 2 and b["device"]["distributed"]["backend"] == "gloo"
    assert "distributed" not in a["device"]
    assert a["run_id"] == b["run_id"] and a["checkpoint_key"] == b["checkpoint_key"] and a["bpw"] == b["bpw"]
    corpus = next(iter(a["ppl"]))
    assert abs(b["ppl"][corpus] / a["ppl"][corpus] - 1) < 0.01, (a["ppl"], b["ppl"])
    peft_a, peft_b = (r["quantize"]["method_report"]["peft"] for r in (a, b))
    assert peft_a["steps"] == peft_b["steps"] > 0 and peft_a["best_epoch"] > 0  # both stages trained something
    assert all(blk["best_epoch"] > 0 for blk in a["quantize"]["method_report"]["blocks"].values())
    assert abs(peft_b["kl_after"] / peft_a["kl_after"] - 1) < 0.05, (peft_a["kl_after"], peft_b["kl_after"])


def test_torchrun_layers_quantized_in_parallel_match_one_process(tmp_path, tiny_cache):
    """VPTQ with full-precision Hessians (the reference protocol: every linear of a block one
    group): two processes quantize alternate linears and exchange them; the stored model is
    the one process's bit for bit (same content hash, same shared codebooks), and the windows
    scored in two shares give its perplexity and KL up to summation order."""
    vptq = ["method=vptq", "bits=2", "method.hessians=fp", "method.true_sequential=false", "method.kmeans_iters=5"]
    one = _job(tmp_path, tiny_cache, "one", [], vptq)
    two = _job(tmp_path, tiny_cache, "two", TORCHRUN2, vptq)
    assert [r["status"] for r in one] == ["ok"] and [r["status"] for r in two] == ["ok"]
    a, b = one[0], two[0]
    assert "linears of a group" in b["device"]["distributed"]["split"]
    assert all("share_s" in s for s in b["quantize"]["block_seconds"].values())  # the exchange happened
    assert a["quantize"]["content_sha"] == b["quantize"]["content_sha"] and a["bpw"] == b["bpw"]
    assert a["quantize"]["layers"] == b["quantize"]["layers"]
    corpus = next(iter(a["ppl"]))
    assert abs(b["ppl"][corpus] / a["ppl"][corpus] - 1) < 1e-9, (a["ppl"], b["ppl"])
    assert abs(b["kl"][corpus] / a["kl"][corpus] - 1) < 1e-6, (a["kl"], b["kl"])
    assert b["top1"][corpus] == a["top1"][corpus]


def test_one_rank_killed_ends_the_group_and_the_rerun_resumes(tmp_path, tiny_cache):
    """Rank 1 of a torchrun job is SIGKILLed in block 1 (as the OOM killer would): the job ends
    (torchrun stops rank 0, which may be waiting in a collective) with no record claiming ok, and
    the rerun resumes from rank 0's saved block 0 to the one-process model bit for bit."""
    vptq = ["method=vptq", "bits=2", "method.hessians=fp", "method.true_sequential=false", "method.kmeans_iters=5"]
    cache = cache_with_tiny_model(tiny_cache, tmp_path / "cache_group")
    p = _run(tmp_path, cache, "died", TORCHRUN2, vptq, env={"TTVQ_FAULT": "block1", "TTVQ_FAULT_RANK": "1"})
    out = p.stdout + p.stderr
    root = out.split("Root Cause")[-1]  # torchrun's report: rank 1 died of SIGKILL, rank 0 was stopped
    assert p.returncode != 0 and "rank      : 1" in root and "exitcode  : -9" in root, out[-3000:]
    assert not [r for r in read_runs(tmp_path / "died") if r.get("status") == "ok"]
    assert (cache / "work").is_dir()  # block 0 was saved by rank 0
    resumed = _job(tmp_path, tiny_cache, "resumed", TORCHRUN2, vptq, cache=cache)
    one = _job(tmp_path, tiny_cache, "one", [], vptq)
    assert [r["status"] for r in resumed] == ["ok"] and resumed[0]["quantize"]["resumed_blocks"] == 1
    assert resumed[0]["quantize"]["content_sha"] == one[0]["quantize"]["content_sha"]


def test_read_only_cache_reads_the_shared_entries_and_writes_only_its_own(tmp_path):
    """What a torchrun rank other than 0 uses: shared entries are read, what it builds goes to a
    private directory (and is found there again), the shared cache is never changed."""
    from ttvq_bench.record.cache import Cache

    shared = Cache(tmp_path / "c")
    shared.get_or_create("k", "a", lambda t: (t / "f").write_text("shared"))
    before = sorted(str(p) for p in (tmp_path / "c").rglob("*"))
    ro = Cache(tmp_path / "c", read_only=True)
    assert (ro.lookup("k", "a") / "f").read_text() == "shared"
    built = ro.get_or_create("k", "b", lambda t: (t / "f").write_text("mine"))
    assert (built / "f").read_text() == "mine" and not built.is_relative_to(tmp_path / "c")
    assert ro.lookup("k", "b") == built and shared.lookup("k", "b") is None
    with ro.lock("quantize-x"), ro.lock("quantize-x"):  # no-op: rank 0 holds the real one
        pass
    assert ro.clean_tmp(0) == 0
    assert sorted(str(p) for p in (tmp_path / "c").rglob("*")) == before


def _evaluate_shares() -> dict:
    """Perplexity, KL and zero-shot log-likelihoods of small models, in whatever group is up."""
    from lm_eval.api.instance import Instance
    from test_zeroshot import _byte_tokenizer, _rigged_model

    from ttvq_bench.data.windows import ppl_windows
    from ttvq_bench.distributed import shard
    from ttvq_bench.evaluate import zeroshot as Z
    from ttvq_bench.evaluate.kl import fp_reference, kl_to_reference
    from ttvq_bench.evaluate.perplexity import perplexity

    student, teacher = _model(), _model()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ids = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    windows = ppl_windows(ids, 24, 9, 1, None)  # overlapping: windows score different token counts
    ref = fp_reference(teacher, windows, 3, 16)  # top-16 of 64: the bucketed KL
    out = {"ppl": perplexity(student, windows, 3, progress=False), "kl": kl_to_reference(student, windows, 3, ref)}
    lm = _rigged_model(_byte_tokenizer(), "a")
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)
            for ctx in ("xy", "a", "ba") for cont in (" ab", " b", "aa")]
    from lm_eval.models.huggingface import HFLM

    seen, scored = [], HFLM._loglikelihood_tokens

    def spy(self, requests, *a, **k):  # what reaches lm-eval's scoring in this process
        seen.append(len(requests))
        return scored(self, requests, *a, **k)

    HFLM._loglikelihood_tokens = spy
    try:
        out["ll"] = Z.make_lm(lm, bos=True, batch_size=2, progress=False).loglikelihood(reqs)
    finally:
        HFLM._loglikelihood_tokens = scored
    out["scored_here"] = sum(seen)
    out["windows_here"] = list(shard(len(windows.input_ids)))
    return out


def _eval_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(_evaluate_shares(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_evaluation_shares_sum_to_one_process(tmp_path, one_thread):
    """Two processes score alternate shares of the windows (and of the zero-shot requests) and
    sum: the figures of one process, windows with different scored-token counts included."""
    one = _evaluate_shares()
    out = tmp_path / "eval.pt"
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "store_eval"), str(out)), nprocs=2, join=True)
    twos = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    assert sorted(twos[0]["windows_here"] + twos[1]["windows_here"]) == one["windows_here"]  # disjoint shares
    assert all(0 < t["scored_here"] < one["scored_here"] for t in twos)
    assert sum(t["scored_here"] for t in twos) == one["scored_here"]
    for two in twos:
        assert two["ppl"]["n_tokens"] == one["ppl"]["n_tokens"] and two["kl"]["n_tokens"] == one["kl"]["n_tokens"]
        assert abs(two["ppl"]["ppl"] / one["ppl"]["ppl"] - 1) < 1e-12, (one["ppl"], two["ppl"])
        assert abs(two["kl"]["kl"] / one["kl"]["kl"] - 1) < 1e-12 and two["kl"]["top1"] == one["kl"]["top1"]
        assert [g for _, g in two["ll"]] == [g for _, g in one["ll"]]
        assert [ll for ll, _ in two["ll"]] == [pytest.approx(ll, rel=1e-6) for ll, _ in one["ll"]]


def test_a_layer_from_another_process_holds_the_shared_codebooks_again(one_thread):
    """What `_quantize_group` does with a layer another rank quantized: it arrives pickled
    (shared codebooks copied), and VPTQ's `adopt_layer` makes it hold the one tensor per scope
    again, with the per-layer report."""
    import pickle

    from ttvq_methods.blockwise import quantize_blockwise
    from ttvq_methods.registry import METHODS
    from ttvq_methods.vptq import VPTQConfig

    model = _model()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    method = METHODS.get("vptq")(VPTQConfig(codebook_scope="model", kmeans_iters=3), 2)
    quantize_blockwise(model, ids, method, batch_size=4, progress=False)
    name = "model.layers.0.self_attn.q_proj"
    q = decoder_layers(model)[0].get_submodule("self_attn.q_proj")
    assert q.shared  # the model-scope codebook
    arrived = pickle.loads(pickle.dumps(q))
    report = method.layer_stats.pop(name)
    assert all(arrived._buffers[b] is not method.books[k][b] for b, k in arrived.shared.items())
    method.adopt_layer(name, arrived, {"layer_stats": report})
    assert all(arrived._buffers[b] is method.books[k][b] for b, k in arrived.shared.items())
    assert method.layer_stats[name] == report
    assert torch.equal(arrived.dequantize(), q.dequantize())
