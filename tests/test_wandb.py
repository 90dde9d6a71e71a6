"""W&B: config, metrics, summary, group and tags are sent; a failed job is finished as failed."""
import pytest

from ttvq_bench.run import run_job


class FakeRun:
    def __init__(self, **kw):
        self.init_kw, self.logged, self.summary, self.exit_code = kw, [], {}, None

    def log(self, d):
        self.logged.append(d)

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    from ttvq_bench.record import wandb_log

    monkeypatch.setattr(wandb_log, "_wandb_init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    return runs


def test_ok_run_is_logged(tiny_cfg, tmp_path, fake_wandb):
    cfg = tiny_cfg("method=rtn", "bits=3", "logger=wandb", "logger.progress=false", "sweep=mysweep")
    run_job(cfg, tmp_path)
    (run,) = fake_wandb
    assert run.init_kw["mode"] == "offline" and run.init_kw["group"] == "mysweep"
    assert {"rtn", "w3", "group_size=-1"} <= set(run.init_kw["tags"])
    assert run.init_kw["config"]["method"]["name"] == "rtn"
    assert any("ppl/default" in d for d in run.logged)
    assert run.summary["status"] == "ok" and run.summary["ppl/default"] > 1
    assert run.exit_code == 0


def test_failed_run_finishes_as_failed(tiny_cfg, tmp_path, fake_wandb, monkeypatch):
    from ttvq_methods import rtn

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(rtn.RTN, "quantize_layer", boom)
    # A config no other test quantizes: a cached checkpoint would skip quantize_layer.
    cfg = tiny_cfg("method=rtn", "bits=2", "method.group_size=16", "logger=wandb", "logger.progress=false")
    with pytest.raises(RuntimeError):
        run_job(cfg, tmp_path)
    (run,) = fake_wandb
    assert run.exit_code == 1 and run.summary["status"] == "failed"


def test_real_offline_run_writes_locally(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_cfg("method=fp16", "logger=wandb", "logger.progress=false")
    run_job(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
