"""W&B: identity (group of the sweep, job_type, tags, name with toggles), final metrics in the
summary (not history), record and per-layer tables, training curves as history, result.json
and the optional checkpoint artifact; skipped points get a summary-only run; a failed job is
finished as failed; a real offline run, read back from its own files."""
import json
import os
import struct
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ttvq_bench.config import WandbConfig
from ttvq_bench.record import wandb_log
from ttvq_bench.record.wandb_log import WandbRun, log_skipped, method_toggles, run_group, training_curves
from ttvq_bench.run import run_job


class FakeRun:
    def __init__(self, **kw):
        self.init_kw, self.logged, self.summary, self.exit_code = kw, [], {}, None
        self.name, self.tags, self.metrics, self.saved, self.artifacts = kw.get("name"), kw.get("tags"), {}, [], []

    def define_metric(self, name, step_metric=None, summary=None):
        self.metrics[name] = (step_metric, summary)

    def log(self, d):
        self.logged.append(d)

    def save(self, path, base_path=None, policy="live"):
        self.saved.append(Path(path).relative_to(base_path).as_posix())

    def log_artifact(self, art):
        self.artifacts.append(art)

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    monkeypatch.setattr(wandb_log, "_wandb_init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    return runs


def wcfg(**over):
    """logger.wandb as composed, with these overrides."""
    return OmegaConf.merge(OmegaConf.structured(WandbConfig), over)


def test_ok_run_is_logged(tiny_cfg, tmp_path, fake_wandb):
    cfg = tiny_cfg("method=rtn", "bits=3", "method.group_size=16", "logger=wandb", "logger.progress=false", "sweep=mysweep")
    rec = run_job(cfg, tmp_path)
    (run,) = fake_wandb
    assert run.init_kw["mode"] == "offline" and run.init_kw["group"] == "mysweep"  # a single run: the sweep as named
    assert run.init_kw["job_type"] == "rtn" and run.init_kw["config"]["method"]["name"] == "rtn"
    assert run.name == "tiny-rtn-w3-group_size=16" and tuple(run.tags) == ("rtn", "w3")
    # final metrics in the summary, never in the history
    assert run.summary["status"] == "ok" and run.summary["ppl/default"] == rec["ppl"]["default"]
    assert run.summary["bpw"] == rec["bpw"] and run.summary["protocol/default/seqlen"] == 64
    assert not any(k.startswith(("ppl/", "bpw", "kl/")) for d in run.logged for k in d)
    assert run.metrics["ppl/*"] == (None, "min") and run.metrics["zeroshot/average"] == (None, "max")
    (tables,) = run.logged  # RTN trains nothing: no curves, only the two tables
    row = dict(zip(tables["record"].columns, tables["record"].data[0]))
    assert row["ppl.default"] == rec["ppl"]["default"] and row["config.method.group_size"] == 16 and row["run_id"] == rec["run_id"]
    layers = tables["layers"]
    assert layers.columns == ["name", "block", "kind", "bpw", "rel_err"] and len(layers.data) == len(rec["quantize"]["layers"])
    first = dict(zip(layers.columns, layers.data[0]))
    assert first["rel_err"] == rec["quantize"]["layers"][first["name"]]["rel_err"] and first["kind"] == first["name"].rsplit(".")[-1]
    assert run.saved == ["result.json"] and run.artifacts == [] and run.exit_code == 0


def test_failed_run_finishes_as_failed(tiny_cfg, tmp_path, fake_wandb, monkeypatch):
    from ttvq_methods import rtn

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(rtn.RTN, "quantize_layer", boom)
    # A config no other test quantizes: a cached checkpoint would skip quantize_layer.
    cfg = tiny_cfg("method=rtn", "bits=2", "method.group_size=32", "logger=wandb", "logger.progress=false")
    with pytest.raises(RuntimeError):
        run_job(cfg, tmp_path)
    (run,) = fake_wandb
    assert run.exit_code == 1 and run.summary["status"] == "failed" and "boom" in run.summary["error"]


def test_wandb_refusing_never_costs_the_job(tiny_cfg, tmp_path, monkeypatch, caplog):
    """A setting W&B rejects at init (e.g. a tag over 64 characters), or an error while logging
    the tables: one warning each, and the job's record is ok."""
    def refuse(**kw):
        raise ValueError("Tag 'x' is 244 characters")

    monkeypatch.setattr(wandb_log, "_wandb_init", refuse)
    rec = run_job(tiny_cfg("method=rtn", "bits=4", "logger=wandb", "logger.progress=false"), tmp_path / "a")
    assert rec["status"] == "ok" and "W&B: no run for this job (Tag 'x' is 244 characters)" in caplog.text
    runs = []
    monkeypatch.setattr(wandb_log, "_wandb_init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setattr(wandb_log, "flat_record", lambda r: 1 / 0)
    rec = run_job(tiny_cfg("method=rtn", "bits=4", "logger=wandb", "logger.progress=false", "force=true"), tmp_path / "b")
    assert rec["status"] == "ok" and runs[0].exit_code == 0 and "the run is incomplete (division by zero)" in caplog.text


def _sweep_dir(tmp_path: Path, started: float) -> Path:
    """A Hydra sweep dir as Hydra leaves it: multirun.yaml written once at the start."""
    sweep = tmp_path / "multirun" / "12-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    os.utime(sweep / "multirun.yaml", (started, started))
    return sweep


def test_identity_from_the_record_and_group_of_the_sweep(tmp_path, fake_wandb):
    started = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    sweep = _sweep_dir(tmp_path, started)
    record = {"run_id": "r1", "method": "gptq", "bits": 2, "model": "stories260K", "sweep": "12-00-00",
              "config": {"method": {"name": "gptq", "group_size": 128, "act_order": True, "sym": False}}}
    for i, experiment in enumerate(["stories260k", None]):
        WandbRun(wcfg(), {}, sweep / f"{i}_gptq_w2", "12-00-00", record, experiment=experiment)
    a, b = fake_wandb
    assert a.init_kw["group"] == "stories260k-20260304-050607" and b.init_kw["group"] == "12-00-00-20260304-050607"
    assert a.init_kw["job_type"] == "gptq" and a.init_kw["tags"] == ["gptq", "w2", "stories260k"] and b.init_kw["tags"] == ["gptq", "w2"]
    assert a.init_kw["name"] == "stories260K-gptq-w2-group_size=128,act_order=true"  # sym=False is GPTQ's default
    assert run_group(wcfg(group="mine"), "x", "e", sweep / "0") == "mine"
    assert method_toggles({"name": "ttvq", "init": "kmeans", "init_args": {"vptq": {"vector_len": 3}}}) == \
        {"init": "kmeans", "init_args.vptq.vector_len": 3}
    assert method_toggles({"name": "not_a_method", "x": 1}) == {"x": 1}  # no known defaults: every field


def test_training_curves_are_history(tiny_cfg, tmp_path, fake_wandb):
    over = ("method=ttvq", "bits=2", "method.block_epochs=2", "method.peft_epochs=3", "method.update_period=1",
            "logger=wandb", "logger.progress=false")
    rec = run_job(tiny_cfg(*over), tmp_path)
    report = json.loads(json.dumps(rec["quantize"]["method_report"]))  # as written: block keys are text
    epochs, updates = training_curves(report)
    assert [r["curves/epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[0]["curves/block1/val"] == report["blocks"]["1"]["history"][0]["val"]
    assert epochs[2]["curves/peft/train"] == report["peft"]["history"][2]["train"] and "curves/block0/train" not in epochs[2]
    rates = report["blocks"]["0"]["change_rates"]
    assert rates and [r["index_change/block0"] for r in updates[:len(rates)]] == rates
    (run,) = fake_wandb
    assert run.logged[:len(epochs) + len(updates)] == epochs + updates and "record" in run.logged[-1]
    # other report shapes: a stage with a history (AQLM's pv), a per-block entry whose blocks have one
    h = [{"epoch": 1, "train": 0.5, "val": 0.6}, {"epoch": 2, "train": 0.4, "val": 0.5}]
    epochs, _ = training_curves({"pv": {"history": h, "kl_after": 0.1}, "finetune": {"0": {"history": h[:1]}, "1": {"steps": 3}},
                                 "proxy_loss": {"model.layers.0.q": 0.1}})
    assert epochs == [{"curves/epoch": 1, "curves/pv/train": 0.5, "curves/pv/val": 0.6, "curves/finetune/block0/train": 0.5,
                       "curves/finetune/block0/val": 0.6}, {"curves/epoch": 2, "curves/pv/train": 0.4, "curves/pv/val": 0.5}]
    assert run.metrics["curves/*"] == ("curves/epoch", None) and run.metrics["index_change/*"] == ("index_change/update", None)


def test_skipped_point_is_a_summary_only_run_in_this_sweep(tmp_path, fake_wandb):
    sweep = _sweep_dir(tmp_path, time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1)))
    out = sweep / "3_rtn_w2"
    out.mkdir()
    old = {"run_id": "r1", "status": "ok", "method": "rtn", "bits": 2, "model": "m", "sweep": "an-old-sweep",
           "ppl": {"c": 12.5}, "config": {"method": {"name": "rtn"}}, "quantize": {"layers": {"l": {"bpw": 2}}}}
    (out / "result.json").write_text(json.dumps(old))
    log_skipped(wcfg(), {"sweep": "12-00-00"}, out, old)
    (run,) = fake_wandb
    assert run.init_kw["group"] == "12-00-00-20260304-050607"  # this sweep's group, not the record's old one
    assert run.summary["skipped"] is True and run.summary["ppl/c"] == 12.5 and run.summary["sweep"] == "an-old-sweep"
    assert run.logged == [] and run.saved == ["result.json"] and run.exit_code == 0


def test_a_job_skipped_by_its_record_still_logs_a_run(tiny_cfg, tmp_path, fake_wandb):
    base = ("method=rtn", "bits=3", "method.group_size=8", "logger=wandb", "logger.progress=false")
    rec = run_job(tiny_cfg(*base, "sweep=first"), tmp_path / "a")
    again = run_job(tiny_cfg(*base, "sweep=second"), tmp_path / "b")
    assert again["run_id"] == rec["run_id"] and again["sweep"] == "first"  # the old record, not rerun
    made, skipped = fake_wandb
    assert skipped.init_kw["group"] == "second" and skipped.name == made.name == "tiny-rtn-w3-group_size=8"
    assert skipped.summary["skipped"] is True and skipped.summary["ppl/default"] == rec["ppl"]["default"]
    assert skipped.logged == [] and skipped.saved == ["result.json"] and skipped.exit_code == 0


def test_checkpoint_artifact_is_optional(tiny_cfg, tmp_path, fake_wandb):
    base = ("method=rtn", "bits=4", "logger=wandb", "logger.progress=false")
    rec = run_job(tiny_cfg(*base), tmp_path / "a")
    assert fake_wandb[0].artifacts == []
    run_job(tiny_cfg(*base, "logger.wandb.log_checkpoint=true", "force=true"), tmp_path / "b")
    (art,) = fake_wandb[1].artifacts
    assert art.type == "model" and art.name == f"checkpoint-{rec['quantize']['content_sha']}"
    assert list(art.manifest.entries) == ["model.safetensors"] and art.metadata["run_id"] == rec["run_id"]


# -------------------------------------------------------------------------------------------
# a real offline run, read back from its transaction log (wandb 0.31's `.wandb` file: W&B's
# leveldb-style log of protobuf records, 32 KiB blocks; the format `wandb sync` uploads)


def read_wandb_file(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, out, pos, buf = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full, first | middle, last
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
    return out


def test_real_offline_run_writes_locally(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    rec = run_job(tiny_cfg("method=rtn", "bits=3", "logger=wandb", "logger.progress=false", "sweep=s"), tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    # wandb-core closes the log a moment after finish() returns: wait for its exit record.
    for _ in range(100):
        records = read_wandb_file(next(run_dir.glob("*.wandb")))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = [r.run for r in records if r.WhichOneof("record_type") == "run"][-1]
    assert (run.run_group, run.job_type, run.display_name, list(run.tags)) == ("s", "rtn", "tiny-rtn-w3", ["rtn", "w3"])
    summary = {"/".join(u.nested_key) or u.key: json.loads(u.value_json)
               for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    assert summary["ppl/default"] == rec["ppl"]["default"] and summary["status"] == "ok"
    history = [{"/".join(i.nested_key) or i.key for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    assert len(history) == 1 and {"record/_type", "layers/_type"} <= history[0]  # the tables; no metric in history
    assert (run_dir / "files" / "result.json").exists() and len(list((run_dir / "files" / "media" / "table").glob("*.json"))) == 2
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0] and "metric" in kinds
