"""End-to-end jobs on a tiny model: records, skip-on-rerun, checkpoint reload, resume after a kill."""
import json
import math

import pytest
import torch

from ttvq_bench.record.results import read_runs
from ttvq_bench.run import run_job


def test_end_to_end_record(tiny_cfg, tmp_path):
    cfg = tiny_cfg("method=gptq", "bits=3")
    rec = run_job(cfg, tmp_path / "out")
    assert rec["status"] == "ok"
    assert 3.0 < rec["bpw"] < 4.5 and rec["bpw_model"] > rec["bpw"] * 0.9
    assert math.isfinite(rec["ppl"]["default"]) and rec["ppl"]["default"] > 1
    proto = rec["protocol"]["default"]
    assert proto["seqlen"] == 64 and proto["stride"] == 64 and proto["bos"] is True
    assert proto["n_tokens"] == 8 * 63
    assert rec["calib"]["n"] == 8 and rec["calib"]["seed"] == 0 and rec["calib"]["corpus"] == "default"
    for k in ("run_id", "timing", "versions", "device", "config", "peak_rss_mb", "model", "head", "seed"):
        assert rec[k] is not None, k
    assert {"quantize_s", "quantize_cpu_s", "eval_s", "total_s"} <= set(rec["timing"])
    assert {"python", "torch", "transformers", "lm_eval", "git_sha", "code_hash"} <= set(rec["versions"])
    on_disk = json.loads((tmp_path / "out" / "result.json").read_text())
    assert on_disk["run_id"] == rec["run_id"]
    runs = read_runs(cfg.results_dir)
    assert [r["status"] for r in runs] == ["ok"]

    # Same config again: skipped, no new line.
    again = run_job(cfg, tmp_path / "out2")
    assert again["run_id"] == rec["run_id"]
    assert len(read_runs(cfg.results_dir)) == 1

    # The saved checkpoint reproduces the quantized model exactly, without re-quantizing.
    ck = rec["quantize"]["checkpoint"]
    rec2 = run_job(tiny_cfg("method=gptq", "bits=3", f"checkpoint={ck}"), tmp_path / "out3")
    assert rec2["quantize"]["source"] == "checkpoint"
    assert rec2["ppl"]["default"] == rec["ppl"]["default"]
    assert rec2["bpw"] == rec["bpw"]


def test_fp16_is_not_quantized(tiny_cfg, tmp_path):
    rec = run_job(tiny_cfg("method=fp16"), tmp_path)
    assert rec["bpw"] == 16.0 and rec["bpw_model"] == 16.0 and rec["bits"] == 16
    # bits do not change fp16: a sweep over bits finds the same run_id and skips.
    assert run_job(tiny_cfg("method=fp16", "bits=2"), tmp_path / "again")["run_id"] == rec["run_id"]
    rtn = run_job(tiny_cfg("method=rtn", "bits=2"), tmp_path / "rtn")
    assert rtn["ppl"]["default"] > rec["ppl"]["default"]  # 2-bit RTN must hurt


def test_killed_job_resumes(tiny_cfg, tmp_path, monkeypatch):
    from ttvq_methods import gptq

    overrides = ("method=gptq", "bits=2", "method.percdamp=0.02")
    cfg = tiny_cfg(*overrides)
    real = gptq.GPTQ.quantize_layer

    def dies_in_block1(self, name, layer, H):
        if ".layers.1." in name:
            raise KeyboardInterrupt  # what a kill looks like from inside the job
        return real(self, name, layer, H)

    monkeypatch.setattr(gptq.GPTQ, "quantize_layer", dies_in_block1)
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, tmp_path / "a")
    runs = read_runs(cfg.results_dir)
    assert [r["status"] for r in runs] == ["failed"]
    key = runs[0]["checkpoint_key"]
    from ttvq_bench.record.cache import Cache

    cache = Cache(cfg.cache_dir)
    assert not cache.has("quantized", key)  # no corrupt / partial checkpoint entry
    assert (cache.root / "work" / key / "block0").is_dir()

    monkeypatch.setattr(gptq.GPTQ, "quantize_layer", real)
    rec = run_job(cfg, tmp_path / "b")
    assert rec["status"] == "ok" and rec["quantize"]["resumed_blocks"] == 1
    assert cache.has("quantized", key)
    # A clean run (no cache) gives the very same model.
    clean = run_job(tiny_cfg(*overrides, "cache=false", "force=true"), tmp_path / "c")
    assert clean["quantize"]["resumed_blocks"] == 0
    assert clean["ppl"]["default"] == rec["ppl"]["default"]


def test_nan_layer_fails_without_ok_record(tiny_cfg, tmp_path, monkeypatch):
    from ttvq_bench.errors import QuantizationError
    from ttvq_methods import rtn

    real = rtn.RTN.quantize_layer

    def nan_layer(self, name, layer, H):
        q = real(self, name, layer, H)
        q.scales[0, 0] = float("nan")
        return q

    monkeypatch.setattr(rtn.RTN, "quantize_layer", nan_layer)
    cfg = tiny_cfg("method=rtn", "bits=4", "method.group_size=8")  # no other test caches this config
    with pytest.raises(QuantizationError, match="NaN"):
        run_job(cfg, tmp_path)
    assert all(r["status"] != "ok" for r in read_runs(cfg.results_dir))


def test_hessians_cached_by_content(tiny_cfg, tmp_path):
    """Block 0's first-group Hessians depend only on the model and calibration inputs, so a second
    config on the same model reuses them. (That cached Hessians give the same model as fresh
    ones is checked by test_killed_job_resumes, whose clean run has cache=false.)"""
    from ttvq_bench.record.cache import Cache

    cfg = tiny_cfg("method=gptq", "bits=2", "method.percdamp=0.05")
    run_job(cfg, tmp_path / "a")
    cache = Cache(cfg.cache_dir)
    n_before = len(list((cache.root / "hessians").iterdir()))
    run_job(tiny_cfg("method=gptq", "bits=4", "method.percdamp=0.05"), tmp_path / "b")
    n_after = len(list((cache.root / "hessians").iterdir()))
    # 2 blocks x 4 groups each; the 4-bit run shares only block 0's first group with the 2-bit run.
    assert n_after - n_before == 8 - 1
