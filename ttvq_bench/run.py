"""One job: load -> calibrate -> quantize -> evaluate -> record.

`run_job` is the whole way through; everything it calls lives in its own room. A job whose
run_id already has an ok record is skipped (so re-running a sweep only runs what is missing);
two jobs with one run_id take turns (a lock), so a repeated launch never races or records
twice; a job that fails writes a `failed` record and re-raises; nothing is marked ok until the
record is on disk.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ttvq_bench.config import validate
from ttvq_bench.device import resolve_autocast, resolve_device, resolve_dtype
from ttvq_bench.distributed import barrier, is_writer, join
from ttvq_bench.errors import ConfigError
from ttvq_bench.faults import fault_point
from ttvq_bench.evaluate.protocol import Evaluation
from ttvq_bench.identity import run_identity
from ttvq_bench.models import load_model
from ttvq_bench.quantize import Quantization, check_finite
from ttvq_bench.record.cache import Cache
from ttvq_bench.record.dirs import check_writable
from ttvq_bench.record.locks import file_lock
from ttvq_bench.record.results import append_run, find_ok, write_json_atomic
from ttvq_bench.record.versions import device_info, versions
from ttvq_bench.record.wandb_log import WandbRun, log_skipped
from ttvq_methods.bits import count_bits
from ttvq_methods.checkpoint import round_to_storage
from ttvq_methods.distill import set_autocast
from ttvq_methods.vq.budget import BUDGET_SLACK

log = logging.getLogger("ttvq")


def default_threads() -> int:
    """Half the cores this process may use, at least 1 (config.py says why)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def force_offline() -> None:
    """Nothing is ever downloaded, whatever the environment says."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"


def run_job(cfg: DictConfig, output_dir: str | Path) -> dict:
    t_start = time.time()
    output_dir = Path(output_dir)
    force_offline()
    validate(cfg)
    check_writable({"results_dir": Path(cfg.results_dir), "output dir": output_dir,
                    **({"cache_dir": Path(cfg.cache_dir)} if cfg.cache else {})})
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or default_threads())
    device, group = join(resolve_device(cfg.device))  # a torchrun job: this process's GPU and group
    writer = is_writer()  # rank 0 of a torchrun job writes (cache, checkpoint, record), the others compute
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, device)  # recorded as what ran
    cfg.autocast = resolve_autocast(cfg.autocast, device)
    set_autocast(cfg.autocast)
    progress = cfg.logger.progress
    cache = Cache(cfg.cache_dir, enabled=cfg.cache, read_only=not writer)
    cache.clean_tmp()
    q = Quantization.resolve(cfg)  # the method (it rejects bits it cannot do), or a checkpoint's identity

    t0 = time.time()
    lm = load_model(cfg.model, cache, progress)
    log.info("model %s loaded (%d parameters, fingerprint %s) in %.1f s", lm.name,
             sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values()), lm.fingerprint, time.time() - t0)
    _check_context(cfg, lm, q)
    round_to_storage(lm.model, cfg.model.storage_dtype)
    run_id, defining = run_identity(cfg, lm, q)
    # (rank 0 of a torchrun job holds the lock for its whole group)
    with file_lock(Path(cfg.results_dir) / ".locks" / f"{run_id}.lock", what=f"run {run_id}") if writer else nullcontext():
        if not cfg.force and (done := find_ok(cfg.results_dir, run_id)):
            log.info("skip: run_id %s already has an ok record (force=true to rerun)", run_id)
            write_json_atomic(output_dir / "result.json", done)
            # still one run in this sweep's W&B group: a summary-only one, `skipped: true`
            log_skipped(cfg.logger.wandb, _wandb_config(cfg), output_dir, done, _sweep_name(cfg))
            return done
        record = _base_record(cfg, lm, q, run_id, defining)
        if group:  # what the processes split (ttvq_bench/distributed.py)
            group["split"] = ["distillation minibatches", "evaluation windows and zero-shot requests"] + (
                ["linears of a group"] if q.checkpoint is None and q.method.parallel_layers else [])
        record["device"].update(compute=str(device), **({"distributed": group} if group else {}))
        wcfg = cfg.logger.wandb if writer else OmegaConf.create({"mode": "disabled"})
        wb = WandbRun(wcfg, _wandb_config(cfg), output_dir, record["sweep"], record)
        try:
            evaluation = Evaluation(cfg, lm, cache, lambda: _fp_model(cfg, cache), device)
            evaluation.take_fp_reference()  # of the model as loaded, before it is quantized
            t0, c0 = time.time(), time.process_time()
            log.info("quantizing: %s at %s bits", q.method_name, q.bits)
            record["quantize"] = q.run(cfg, lm, cache, record, progress, device)
            check_finite(lm.model, "the model to evaluate")
            record["timing"]["quantize_s"] = round(time.time() - t0, 3)
            # this process's CPU seconds (all its threads): comparable across loads on a shared box
            record["timing"]["quantize_cpu_s"] = round(time.process_time() - c0, 3)
            log.info("quantized (%s) in %.1f s: %.4f bpw", record["quantize"]["source"], time.time() - t0,
                     count_bits(lm.model, cfg.model.storage_dtype)["bpw"])
            record.update(count_bits(lm.model, cfg.model.storage_dtype))
            record["over_budget"] = record["bpw"] > q.bits + BUDGET_SLACK  # placed by its bpw in every table
            wb.log({"bpw": record["bpw"], "bpw_model": record["bpw_model"]})
            t0 = time.time()
            fault_point("eval")
            evaluation.run(record, wb, progress)
            record["timing"]["eval_s"] = round(time.time() - t0, 3)
            record["status"] = "ok"
        except BaseException as e:
            record.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            if writer:
                _finish(record, cfg, output_dir, wb, t_start)
            if record["status"] == "ok":  # a failed process exits at once: torchrun then stops the
                barrier()  # others (they may wait in a collective); else all end after rank 0's record
    log.info("bpw %.4f (model %.4f)  ppl %s  [%s]", record["bpw"], record["bpw_model"], record["ppl"], run_id)
    log.info("done: run dir %s, checkpoint %s, record %s/runs.jsonl (run_id %s)", output_dir,
             record["quantize"].get("checkpoint"), cfg.results_dir, run_id)
    return record


def _fp_model(cfg, cache):
    lm = load_model(cfg.model, cache, False)
    round_to_storage(lm.model, cfg.model.storage_dtype)
    return lm.model


def _finish(record: dict, cfg, output_dir: Path, wb, t_start: float) -> None:
    """runs.jsonl first, result.json second: a job that cannot append its record (a full disk)
    turns failed, and its result.json says so, never ok."""
    record["timing"]["total_s"] = round(time.time() - t_start, 3)
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    try:
        append_run(cfg.results_dir, record)
    except OSError as e:
        record.update(status="failed", error=f"could not append the record to {cfg.results_dir}/runs.jsonl: {e}")
        write_json_atomic(output_dir / "result.json", record)
        wb.finish(record, False)
        raise
    write_json_atomic(output_dir / "result.json", record)
    wb.finish(record, record["status"] == "ok")


def _check_context(cfg, lm, q: Quantization) -> None:
    """Windows longer than the model's context would run silently on positions it never saw."""
    ctx = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
    checks = [("eval.ppl.seqlen", cfg.eval.ppl.seqlen)] + ([("calib.seqlen", cfg.calib.seqlen)] if q.needs_calibration else [])
    for key, n in checks:
        if ctx is not None and n > ctx:
            raise ConfigError(f"{key}={n} exceeds the context of {lm.name} ({ctx} positions): use at most {ctx}")


def _wandb_config(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _sweep_name(cfg) -> str | None:
    """`sweep=`, else in a Hydra sweep its dir's name, else none (a single run)."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.sweep is not None or not HydraConfig.initialized():
        return cfg.sweep
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else None


def _base_record(cfg, lm, q: Quantization, run_id: str, defining: dict) -> dict:
    sweep = _sweep_name(cfg)
    return {
        "run_id": run_id, "status": "running", "method": q.method_name, "bits": q.bits, "model": lm.name,
        "model_info": {k: v for k, v in lm.info.items() if k != "train_log"}, "model_fingerprint": lm.fingerprint,
        "head": q.head_name, "bpw": None, "bpw_model": None, "ppl": {}, "kl": {}, "top1": {}, "zeroshot": {}, "speed": {},
        "protocol": {}, "calib": None, "timing": {}, "peak_rss_mb": None, "versions": versions(),
        "device": {**device_info(), "compute": str(resolve_device(cfg.device)), "dtype": str(cfg.model.dtype),
                   "autocast": cfg.autocast},
        "seed": cfg.seed, "sweep": sweep, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": defining,
    }
