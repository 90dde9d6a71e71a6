"""Fault injection: what a researcher's jobs meet in real use (kill -9 at every stage, damaged
cache files and checkpoints, two identical jobs at once, a torn runs.jsonl, unwritable
directories, bad inputs). Each case checks the exit code, that the user reads one `error:`
line, that no wrong `ok` record appears, and, where a rerun makes sense, that the rerun's
result equals an uninterrupted run's bit for bit.

Kills are real SIGKILLs of real jobs (ttvq_bench/faults.py: TTVQ_FAULT=<point>)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, cache_with_tiny_model
from ttvq_bench.record.results import read_runs

pytestmark = pytest.mark.usefixtures("one_thread")

# TTVQ small enough for seconds per job (the same settings as tests/test_ttvq.py).
TTVQ = ["method=ttvq", "bits=2", "+method.init_args.vptq.kmeans_iters=10", "method.block_epochs=2",
        "method.peft_epochs=1", "method.block_batch_size=4", "method.peft_batch_size=4", "method.val_fraction=0.25"]


def job(tmp_path, tiny_cache, *args, results=None, env=None, fault=None, cwd=None, name="run"):
    """One real `python -m ttvq_bench` process on the tiny model."""
    e = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    if fault:
        e["TTVQ_FAULT"] = fault
    flags = [a for a in args if a.startswith("-")]  # Hydra wants flags before the overrides
    cmd = [sys.executable, "-m", "ttvq_bench", *flags, *TINY, f"cache_dir={tiny_cache}",
           f"results_dir={results or tmp_path / 'results'}", f"hydra.run.dir={tmp_path / name}", "threads=1",
           *[a for a in args if not a.startswith("-")]]
    p = subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=600, env=e)
    p.out = p.stdout + p.stderr  # the log goes to stdout, `error:` lines to stderr
    return p


def errors(p) -> list[str]:
    return [l for l in p.stderr.splitlines() if l.startswith("error:")]


def oks(results: Path) -> list[dict]:
    return [r for r in read_runs(results) if r.get("status") == "ok"]


def layer_errs(rec: dict) -> dict:
    return {n: s["rel_err"] for n, s in rec["quantize"]["layers"].items()}


@pytest.fixture
def cache(tmp_path, tiny_cache):
    """A cache of its own per test (the tiny model copied in, not retrained)."""
    return cache_with_tiny_model(tiny_cache, tmp_path / "cache")


# -- kill -9 at every stage, then rerun: bit-identical to an uninterrupted run -------------------
@pytest.mark.parametrize("args", [["method=gptq", "bits=3", "model.storage_dtype=float32"], TTVQ],
                         ids=["gptq-fp32-storage", "ttvq"])
def test_killed_during_a_block_resumes_exactly(tmp_path, tiny_cache, cache, args):
    p = job(tmp_path, cache, *args, fault="block1", name="a")
    assert p.returncode == -9 and not oks(tmp_path / "results")
    assert (cache / "work").is_dir()  # block 0 is saved
    p = job(tmp_path, cache, *args, name="b")
    assert p.returncode == 0, p.stderr[-2000:]
    resumed = oks(tmp_path / "results")[-1]
    assert resumed["quantize"]["resumed_blocks"] == 1
    clean = job(tmp_path, cache, *args, "cache=false", "force=true", name="c", results=tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    c = oks(tmp_path / "clean")[-1]
    assert c["quantize"]["resumed_blocks"] == 0 and c["run_id"] == resumed["run_id"]
    assert resumed["ppl"] == c["ppl"] and resumed["bpw"] == c["bpw"] and layer_errs(resumed) == layer_errs(c)


def test_killed_during_eval_and_during_checkpoint_write(tmp_path, tiny_cache, cache):
    args = ["method=gptq", "bits=3"]
    p = job(tmp_path, cache, *args, fault="write:model.safetensors", name="a")
    assert p.returncode == -9 and not oks(tmp_path / "results")
    assert not (cache / "quantized").exists() or not any((cache / "quantized").glob("*/.complete"))
    leftovers = list((cache / "quantized").glob(".tmp-*"))
    assert leftovers  # what the killed writer left ...
    p = job(tmp_path, cache, *args, fault="eval", name="b")
    assert p.returncode == -9 and not oks(tmp_path / "results")
    assert not any(x.exists() for x in leftovers)  # ... the next job cleaned up (its writer is gone)
    p = job(tmp_path, cache, *args, name="c")
    assert p.returncode == 0, p.stderr[-2000:]
    rec = oks(tmp_path / "results")[-1]
    assert rec["quantize"]["source"] == "cache"  # the eval-killed job had finished and saved it
    assert rec["quantize"]["layers"] and rec["quantize"]["method_report"] == {}  # stats kept from the file
    clean = job(tmp_path, cache, *args, "cache=false", "force=true", name="d", results=tmp_path / "clean")
    assert oks(tmp_path / "clean")[-1]["ppl"] == rec["ppl"]


def test_killed_mid_append_tears_no_other_record(tmp_path, tiny_cache, cache):
    p = job(tmp_path, cache, "method=rtn", "bits=4", fault="append", name="a")
    assert p.returncode == -9
    raw = (tmp_path / "results" / "runs.jsonl").read_text()
    assert raw and not raw.endswith("\n")  # half a line
    p = job(tmp_path, cache, "method=rtn", "bits=3", name="b")
    assert p.returncode == 0, p.stderr[-2000:]
    runs = read_runs(tmp_path / "results")
    assert [(r["bits"], r["status"]) for r in runs] == [(3, "ok")]  # the torn line skipped, the next intact
    p = job(tmp_path, cache, "method=rtn", "bits=4", name="c")  # the torn job runs again
    assert p.returncode == 0 and sorted(r["bits"] for r in oks(tmp_path / "results")) == [3, 4]


# -- damaged files ------------------------------------------------------------------------------
def test_damaged_cache_entry_is_discarded_and_rebuilt(tmp_path, tiny_cache, cache):
    assert job(tmp_path, cache, "method=gptq", "bits=3", name="a").returncode == 0
    first = oks(tmp_path / "results")[-1]
    ckpt = Path(first["quantize"]["checkpoint"])
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = os.urandom(4096)
    ckpt.write_bytes(bytes(data[: len(data) - 100]))  # garbage inside, and truncated
    p = job(tmp_path, cache, "method=gptq", "bits=3", "force=true", name="b")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "damaged" in p.out and "building it again" in p.out
    again = oks(tmp_path / "results")[-1]
    assert again["quantize"]["source"] == "quantized" and again["ppl"] == first["ppl"]


def _build_and_read(root: str, n: int, failures) -> None:
    import random
    import shutil
    import time

    from ttvq_bench.record.cache import Cache

    rmtree, rng = shutil.rmtree, random.Random(os.getpid())

    def slow_rmtree(*a, **k):  # widens every window around a removal from microseconds to a millisecond
        time.sleep(rng.random() * 2e-3)
        return rmtree(*a, **k)

    shutil.rmtree = slow_rmtree  # this process only (forked)
    c = Cache(root)
    for i in range(n):
        try:
            (c.get_or_create("k", f"key{i}", lambda tmp: (tmp / "f.txt").write_text("x" * 1000)) / "f.txt").read_text()
        except OSError:
            failures.value += 1


def test_parallel_writers_never_remove_a_published_entry(tmp_path):
    """Jobs of one sweep build the same entry at once (the KL reference) and read it right after:
    a writer that lost the race once removed the winner's entry under its reader (a red CI)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    failures = ctx.Value("i", 0)
    procs = [ctx.Process(target=_build_and_read, args=(str(tmp_path / "c"), 400, failures)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6 and failures.value == 0


def test_bit_flipped_or_truncated_checkpoint_is_refused(tmp_path, tiny_cache, cache):
    assert job(tmp_path, cache, "method=gptq", "bits=3", name="a").returncode == 0
    ckpt = Path(oks(tmp_path / "results")[-1]["quantize"]["checkpoint"])
    flipped, truncated = tmp_path / "flipped.safetensors", tmp_path / "truncated.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-50] ^= 0x10
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(ckpt.read_bytes()[:200])
    for bad, needle in ((flipped, "corrupt"), (truncated, "unreadable"), (tmp_path / "nope.safetensors", "not found")):
        p = job(tmp_path, cache, "method=gptq", "bits=3", f"checkpoint={bad}", name="b", results=tmp_path / "r2")
        assert p.returncode != 0 and len(errors(p)) == 1 and needle in errors(p)[0], p.stderr[-2000:]
        assert "Traceback" not in p.stderr and not oks(tmp_path / "r2")


# -- checkpoint= identity -----------------------------------------------------------------------
def test_checkpoint_identity_comes_from_the_file(tmp_path, tiny_cache, cache):
    assert job(tmp_path, cache, "method=gptq", "bits=3", name="a").returncode == 0
    src = oks(tmp_path / "results")[-1]
    ck = src["quantize"]["checkpoint"]
    for lie in (["method=rtn", "bits=2"], ["method.act_order=true"]):
        p = job(tmp_path, cache, *lie, f"checkpoint={ck}", name="b", results=tmp_path / "r2")
        assert p.returncode != 0 and len(errors(p)) == 1 and "holds gptq at 3 bits" in errors(p)[0], p.stderr[-2000:]
    assert not oks(tmp_path / "r2")
    p = job(tmp_path, cache, f"checkpoint={ck}", "method=gptq", name="c", results=tmp_path / "r2")
    assert p.returncode == 0, p.stderr[-2000:]
    rec = oks(tmp_path / "r2")[-1]
    assert (rec["method"], rec["bits"], rec["config"]["method"]) == ("gptq", 3, src["config"]["method"])
    assert rec["ppl"] == src["ppl"] and rec["calib"]["text_sha"] == src["calib"]["text_sha"]
    assert rec["quantize"]["layers"] == src["quantize"]["layers"]  # stats travel with the file
    # another model of the same architecture (another tiny seed) refuses it
    p = job(tmp_path, cache, f"checkpoint={ck}", "method=gptq", "model.tiny.seed=7", name="d", results=tmp_path / "r3")
    assert p.returncode != 0 and len(errors(p)) == 1 and "quantized from model" in errors(p)[0], p.stderr[-2000:]
    assert not oks(tmp_path / "r3")


def test_checkpoint_of_another_architecture_is_one_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ttvq_bench.errors import DataError
    from ttvq_methods.checkpoint import load_module_state, save_module_state
    from ttvq_methods.rtn import RTN, RTNConfig

    def llama(layers, width):
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=width, intermediate_size=32, num_hidden_layers=layers,
                                            num_attention_heads=2, num_key_value_heads=1))

    m = llama(2, 16)
    m.model.layers[0].mlp.up_proj = RTN(RTNConfig(), 4).quantize_layer("x", m.model.layers[0].mlp.up_proj, None)
    save_module_state(m, tmp_path / "c.safetensors")
    for other in (llama(1, 16), llama(2, 32)):
        with pytest.raises(DataError, match="does not fit this model"):
            load_module_state(other, tmp_path / "c.safetensors")


# -- races and disks ----------------------------------------------------------------------------
def test_two_identical_jobs_at_once(tmp_path, tiny_cache, cache):
    out = {}

    def go(name):
        out[name] = job(tmp_path, cache, *TTVQ, name=name)

    threads = [threading.Thread(target=go, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out["a"].returncode == 0 and out["b"].returncode == 0, (out["a"].stderr[-1500:], out["b"].stderr[-1500:])
    runs = read_runs(tmp_path / "results")
    assert [r["status"] for r in runs] == ["ok"]  # one record; the other job waited and skipped
    results = [json.loads((tmp_path / n / "result.json").read_text()) for n in ("a", "b")]
    assert results[0]["ppl"] == results[1]["ppl"] and results[0]["run_id"] == results[1]["run_id"]


def test_unwritable_results_dir(tmp_path, cache):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        # root writes read-only directories; /proc is read-only for everyone
        target = ro / "results" if not os.access(ro, os.W_OK) else Path("/proc/self/ttvq-results")
        p = job(tmp_path, cache, "method=rtn", results=target)
        assert p.returncode != 0 and len(errors(p)) == 1 and "not writable" in errors(p)[0], p.stderr[-2000:]
        assert "Traceback" not in p.stderr
    finally:
        ro.chmod(stat.S_IRWXU)


def test_full_disk_found_before_any_work(monkeypatch, tmp_path):
    import shutil

    from ttvq_bench.errors import DataError
    from ttvq_bench.record.dirs import check_writable

    monkeypatch.setattr(shutil, "disk_usage", lambda d: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(DataError, match="MB free"):
        check_writable({"results_dir": tmp_path})


def test_killed_sweep_point_costs_only_itself(tmp_path, tiny_cache, cache):
    p = job(tmp_path, cache, "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "method=rtn", "bits=3,4",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", env={"TTVQ_FAULT_ARGV": "bits=3"}, fault="eval")
    assert p.returncode != 0
    assert any("killed by SIGKILL" in l for l in errors(p)), p.stderr[-2000:]
    assert "1 job(s) of the sweep failed" in p.stderr, p.out[-6000:]
    runs = read_runs(tmp_path / "results")
    assert [(r.get("bits"), r["status"]) for r in runs if r["status"] == "ok"] == [(4, "ok")]
    assert [r for r in runs if r["status"] == "failed" and "bits=3" in r.get("overrides", [])]


# -- identity -----------------------------------------------------------------------------------
def test_run_id_survives_a_symlinked_data_root_and_tracks_calibration_text(tmp_path, tiny_cache, cache):
    docs = "\n\n".join(f"Document {i}. " + "the cat sat on the mat and looked at the dog. " * 30 for i in range(60))
    real = tmp_path / "data"
    real.mkdir()
    (real / "text.txt").write_text(docs)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    base = ["method=rtn", "bits=4", "data=file", "data@calib.corpus=file"]
    a = job(tmp_path, cache, *base, f"data.path={real / 'text.txt'}", f"calib.corpus.path={real / 'text.txt'}", name="a")
    assert a.returncode == 0, a.stderr[-2000:]
    b = job(tmp_path, cache, *base, f"data.path={tmp_path / 'link' / 'text.txt'}",
            f"calib.corpus.path={tmp_path / 'link' / 'text.txt'}", name="b")
    assert b.returncode == 0 and "skip: run_id" in b.out  # the same job, found by content
    (real / "text.txt").write_text(docs.replace("Document 59.", "Document fifty-nine."))  # the calibration split (last 10%)
    c = job(tmp_path, cache, *base, f"data.path={real / 'text.txt'}", f"calib.corpus.path={real / 'text.txt'}", name="c")
    assert c.returncode == 0 and "skip: run_id" not in c.out
    runs = oks(tmp_path / "results")
    assert len(runs) == 2 and runs[0]["run_id"] != runs[1]["run_id"]


def test_code_versions_are_scoped():
    """Editing TTVQ leaves GPTQ's and VPTQ's code version (cache keys, run_ids) alone and the
    other way round; editing shared machinery changes both."""
    from ttvq_bench.record.versions import scoped_code_hash

    def edit(target):
        return lambda p: p.read_bytes() + (b"\n# an edit\n" if p.name == target else b"")

    roots = {m: ("ttvq_methods.blockwise", f"ttvq_methods.{m}") for m in ("gptq", "vptq", "ttvq")}
    before = {m: scoped_code_hash(r) for m, r in roots.items()}
    after_ttvq = {m: scoped_code_hash(r, edit("ttvq.py")) for m, r in roots.items()}
    after_gptq = {m: scoped_code_hash(r, edit("gptq.py")) for m, r in roots.items()}
    after_shared = {m: scoped_code_hash(r, edit("second_order.py")) for m, r in roots.items()}
    assert after_ttvq["ttvq"] != before["ttvq"] and after_ttvq["gptq"] == before["gptq"] and after_ttvq["vptq"] == before["vptq"]
    assert after_gptq["gptq"] != before["gptq"] and after_gptq["ttvq"] == before["ttvq"]
    assert all(after_shared[m] != before[m] for m in roots)
    yaml_edit = scoped_code_hash(roots["gptq"], edit("ttvq.yaml"))
    assert yaml_edit == before["gptq"]  # config comments are not code


# -- bad inputs: one line each, no ok record ------------------------------------------------------
def _bad_inputs(tmp_path: Path, data: Path) -> list:
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(os.urandom(2000))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("caf\xe9 " * 400 + "\n\n" + "na\xefve " * 400 + "\n\n") .encode("latin-1") * 5)
    cases = [
        (["method=gptq", "eval.ppl.seqlen=128"], "exceeds the context"),
        (["method=rtn", "data=file", f"data.path={latin}"], "not UTF-8"),
    ]
    stories = data / "stories260K"
    if (stories / "stories260K.bin").is_file():
        cases += [
            (["model=llama2c", f"model.path={stories / 'stories260K.bin'}", f"model.tokenizer={garbage}"], "not a SentencePiece"),
            (["model=llama2c", f"model.path={stories / 'stories260K.bin'}", f"model.tokenizer={stories / 'tok512.bin'}"],
             "not a SentencePiece"),
        ]
    return cases


def test_bad_inputs_one_line_each(tmp_path, tiny_cache, cache):
    from conftest import DATA

    for i, (args, needle) in enumerate(_bad_inputs(tmp_path, DATA)):
        p = job(tmp_path, cache, *args, name=f"bad{i}")
        assert p.returncode != 0, args
        assert len(errors(p)) == 1 and needle in errors(p)[0], (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr and "Error executing job" not in p.stderr, args
    assert not oks(tmp_path / "results")


@pytest.mark.parametrize("override, needle", [("eval.ppl.seqlen=1", "at least 2"), ("calib.seqlen=1", "at least 2"),
                                             ("method.group_size=0", "group_size"), ("method=gptq method.group_size=-2", "group_size")])
def test_bad_values_fail_before_any_work(tiny_cfg, tmp_path, override, needle):
    """In-process (the CLI's one-line printing of these errors is tests/test_cli.py's)."""
    from ttvq_bench.errors import ConfigError
    from ttvq_bench.run import run_job

    with pytest.raises(ConfigError, match=needle):
        run_job(tiny_cfg("method=rtn", *override.split()), tmp_path / "out")
    assert not (tmp_path / "results").exists() or not oks(tmp_path / "results")


def test_hf_dir_with_garbage_weights_or_nan(tmp_path, cache):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf_tok.add_tokens([chr(c) for c in range(97, 123)])
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    for kind in ("garbage", "nan"):
        d = tmp_path / kind
        m = LlamaForCausalLM(cfg)
        if kind == "nan":
            with torch.no_grad():
                m.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
        m.save_pretrained(d)
        hf_tok.save_pretrained(d)
        if kind == "garbage":
            (d / "model.safetensors").write_bytes(os.urandom(5000))
        p = job(tmp_path, cache, "model=hf", f"model.path={d}", "method=rtn", name=kind)
        assert p.returncode != 0 and len(errors(p)) == 1, (kind, p.stderr[-2000:])
        assert ("NaN" in errors(p)[0]) if kind == "nan" else ("cannot load" in errors(p)[0]), errors(p)
        assert "Traceback" not in p.stderr


def test_wandb_online_without_key_falls_back_offline(tmp_path, tiny_cache, cache):
    env = {"WANDB_API_KEY": None, "NETRC": str(tmp_path / "no-netrc"), "WANDB_MODE": None}
    p = job(tmp_path, cache, "method=rtn", "bits=4", "logger=wandb", "logger.wandb.mode=online", env=env, name="w")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "no API key" in p.out and oks(tmp_path / "results")
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*"))


def test_wandb_online_unreachable_falls_back_offline(tmp_path, cache):
    """A key but no service (a closed port on this machine): offline after init_timeout."""
    env = {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_MODE": None}
    p = job(tmp_path, cache, "method=rtn", "bits=4", "logger=wandb", "logger.wandb.mode=online",
            "logger.wandb.init_timeout=2", env=env, name="w")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "online init failed" in p.out and oks(tmp_path / "results")


def test_result_json_never_says_ok_when_the_record_cannot_be_written(tiny_cfg, tmp_path, monkeypatch):
    from ttvq_bench import run as run_mod

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_mod, "append_run", full_disk)
    with pytest.raises(OSError):
        run_mod.run_job(tiny_cfg("method=rtn", "bits=4"), tmp_path / "out")
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["status"] == "failed" and "No space left" in res["error"]


def test_one_quantization_many_evaluations(tiny_cfg, tmp_path):
    """Adding zero-shot tasks to a finished quantization reuses its checkpoint and keeps its
    per-layer stats and method report; the table merges both evaluations into one row."""
    from ttvq_analysis.load import load_runs
    from ttvq_bench.run import run_job

    base = ("method=vptq", "bits=2", "method.codebook_scope=model", "method.kmeans_iters=5")
    a = run_job(tiny_cfg(*base), tmp_path / "a")
    b = run_job(tiny_cfg(*base, "eval.zeroshot.tasks=[default_lastword]", "eval.zeroshot.limit=20"), tmp_path / "b")
    assert a["run_id"] != b["run_id"] and b["quantize"]["source"] == "cache"
    assert b["quantize"]["layers"] == a["quantize"]["layers"]
    assert b["quantize"]["method_report"] == a["quantize"]["method_report"] and a["quantize"]["method_report"]["shape"]
    entry = Path(a["quantize"]["checkpoint"])
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in entry.parent.iterdir())  # a team can read it
    df = load_runs(tmp_path / "results")
    assert len(df) == 1 and df["ppl.default"].iloc[0] == a["ppl"]["default"]
    assert df["zeroshot.average"].iloc[0] == b["zeroshot"]["average"]
    assert set(df["run_id"].iloc[0].split(",")) == {a["run_id"], b["run_id"]}


def test_never_downloads_whatever_the_environment_says(monkeypatch):
    from ttvq_bench.run import force_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    force_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
