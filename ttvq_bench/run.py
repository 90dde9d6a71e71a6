"""One job: load -> calibrate -> quantize -> evaluate -> record.

`run_job` is the whole way through; everything it calls lives in its own room. A job whose
run_id already has an ok record is skipped (so re-running a sweep only runs what is missing);
a job that fails writes a `failed` record and re-raises; nothing is marked ok until the end.
"""
from __future__ import annotations

import logging
import resource
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ttvq_bench.config import validate
from ttvq_bench.errors import ConfigError
from ttvq_bench.data.calib import calibration_ids
from ttvq_bench.data.corpora import load_text
from ttvq_bench.data.windows import ppl_windows
from ttvq_bench.evaluate.perplexity import perplexity
from ttvq_bench.hashing import hash_bytes, hash_obj
from ttvq_bench.models import load_model
from ttvq_bench.record.cache import Cache
from ttvq_bench.record.results import append_run, find_ok, write_json_atomic
from ttvq_bench.record.versions import code_hash, device_info, versions
from ttvq_bench.record.wandb_log import WandbRun
from ttvq_methods.bits import count_bits
from ttvq_methods.blockwise import quantize_blockwise
from ttvq_methods.checkpoint import load_module_state, round_to_storage, save_module_state
from ttvq_methods.heads import HEADS
from ttvq_methods.registry import METHODS

log = logging.getLogger("ttvq")

# Keys that do not change a result (where it is written, how it is logged, whether cached).
NON_DEFINING = ("logger", "results_dir", "cache_dir", "cache", "force", "save_checkpoint", "sweep", "paths", "threads")


def run_job(cfg: DictConfig, output_dir: str | Path) -> dict:
    t_start = time.time()
    output_dir = Path(output_dir)
    validate(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    progress = cfg.logger.progress
    method_cls = METHODS.get(cfg.method.name)
    if method_cls.fixed_bits is not None:
        cfg.bits = method_cls.fixed_bits
    method = method_cls(OmegaConf.to_object(cfg.method), cfg.bits)  # rejects bits it cannot do
    head = HEADS.get(cfg.head.name)(OmegaConf.to_object(cfg.head))
    cache = Cache(cfg.cache_dir, enabled=cfg.cache)

    lm = load_model(cfg.model, cache, progress)
    round_to_storage(lm.model, cfg.model.storage_dtype)
    eval_corpora = _eval_corpora(cfg)
    defining = {k: v for k, v in _plain(cfg).items() if k not in NON_DEFINING}
    run_id = hash_obj({"config": defining, "model": lm.fingerprint, "code": code_hash(),
                       "data": {c.name: hash_bytes(load_text(c, "eval")[0].encode()) for c in eval_corpora}})
    if not cfg.force and (done := find_ok(cfg.results_dir, run_id)):
        log.info("skip: run_id %s already has an ok record (force=true to rerun)", run_id)
        write_json_atomic(output_dir / "result.json", done)
        return done

    record = _base_record(cfg, lm, run_id, defining)
    tags = [cfg.method.name, f"w{cfg.bits}"] + [f"{k}={v}" for k, v in defining["method"].items() if k != "name"]
    wb = WandbRun(cfg.logger.wandb, _plain(cfg), output_dir, record["sweep"], tags,
                  name=f"{lm.name}-{cfg.method.name}-w{cfg.bits}")
    ok = False
    try:
        t0 = time.time()
        record["quantize"] = _quantize(cfg, lm, method, head, cache, record, progress)
        record["timing"]["quantize_s"] = round(time.time() - t0, 3)
        record.update({k: v for k, v in count_bits(lm.model, cfg.model.storage_dtype).items()})
        wb.log({"bpw": record["bpw"], "bpw_model": record["bpw_model"]})

        t0 = time.time()
        for corpus in eval_corpora:
            res, proto = _perplexity(cfg, lm, corpus, progress)
            record["ppl"][corpus.name] = res["ppl"]
            record["protocol"][corpus.name] = proto
            wb.log({f"ppl/{corpus.name}": res["ppl"]})
            log.info("ppl[%s] = %.4f  (%d tokens)", corpus.name, res["ppl"], res["n_tokens"])
        if cfg.eval.zeroshot.tasks:
            from ttvq_bench.evaluate.zeroshot import evaluate_zeroshot

            record["zeroshot"] = evaluate_zeroshot(cfg, lm, cache, record, progress)
            wb.log({"zeroshot": record["zeroshot"]})
        record["timing"]["eval_s"] = round(time.time() - t0, 3)
        record["status"] = "ok"
        ok = True
    except BaseException as e:
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        record["timing"]["total_s"] = round(time.time() - t_start, 3)
        record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        write_json_atomic(output_dir / "result.json", record)
        append_run(cfg.results_dir, record)
        wb.finish(record, ok)
    log.info("bpw %.4f (model %.4f)  ppl %s  [%s]", record["bpw"], record["bpw_model"], record["ppl"], run_id)
    return record


def _eval_corpora(cfg) -> list:
    if not cfg.eval.ppl.enabled:
        return []
    corpora = [cfg.data]
    for kind in cfg.eval.ppl.extra:
        # Extra corpora use the data group's default paths for that kind.
        corpora.append(OmegaConf.merge(cfg.data, {"name": kind, "kind": kind, "path": _default_path(cfg, kind)}))
    return corpora


def _default_path(cfg, kind: str) -> str | None:
    root = cfg.paths.data_root
    return {"tinystories": f"{root}/tinystories/tinystories_val.txt", "wikitext2": f"{root}/wikitext2",
            "wikitext2_raw": f"{root}/wikitext2"}.get(kind)


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _quantize(cfg, lm, method, head, cache: Cache, record: dict, progress: bool) -> dict:
    """Quantize the model in place (or load a saved/cached quantized checkpoint)."""
    if cfg.checkpoint:
        extra = load_module_state(lm.model, cfg.checkpoint)
        return {"source": "checkpoint", "checkpoint": str(cfg.checkpoint), "meta": extra}
    if not (method.needs_calibration or head.needs_calibration):
        head.apply(lm.model, None)
        return {"source": "none"}
    calib, calib_info = calibration_ids(cfg.calib, lm.tokenizer, cache)
    record["calib"] = calib_info
    key = hash_obj({"model": lm.fingerprint, "calib": calib_info["key"], "method": record["config"]["method"],
                    "head": record["config"]["head"], "bits": cfg.bits, "dtype": cfg.model.dtype,
                    "storage": cfg.model.storage_dtype, "code": code_hash()})
    record["checkpoint_key"] = key
    if cache.has("quantized", key):
        path = cache.path("quantized", key) / "model.safetensors"
        extra = load_module_state(lm.model, path)
        return {"source": "cache", "checkpoint": str(path), "meta": extra}

    resume = cache.root / "work" / key  # per-block progress of this exact quantization
    stats = {"layers": {}, "resumed_blocks": 0}
    if method.needs_calibration:
        stats = quantize_blockwise(lm.model, calib, method, batch_size=cfg.eval.ppl.batch_size,
                                   resume_dir=resume if cfg.cache else None, cache=cache, progress=progress)
    head_report = head.apply(lm.model, calib)
    round_to_storage(lm.model, cfg.model.storage_dtype)
    meta = {"method": cfg.method.name, "bits": cfg.bits, "model": lm.name, "model_fingerprint": lm.fingerprint,
            "calib": calib_info, "method_config": record["config"]["method"], "code_hash": code_hash()}
    path = None
    if cfg.save_checkpoint:
        with cache.writing("quantized", key) as tmp:
            save_module_state(lm.model, tmp / "model.safetensors", cfg.model.storage_dtype, extra=meta)
        path = str(cache.path("quantized", key) / "model.safetensors")
    shutil.rmtree(resume, ignore_errors=True)
    return {"source": "quantized", "checkpoint": path, "resumed_blocks": stats["resumed_blocks"],
            "layers": stats["layers"], "method_report": method.report(), "head_report": head_report}


def _perplexity(cfg, lm, corpus, progress: bool):
    p = cfg.eval.ppl
    text, source = load_text(corpus, "eval")
    bos = lm.tokenizer.bos_id if p.bos else None
    if p.bos and bos is None:
        raise ConfigError("eval.ppl.bos=true but the tokenizer has no BOS token")
    windows = ppl_windows(lm.tokenizer.encode(text), p.seqlen, p.stride, bos, p.max_windows)
    res = perplexity(lm.model, windows, p.batch_size, progress, desc=f"ppl[{corpus.name}]")
    proto = {"seqlen": p.seqlen, "stride": p.stride or p.seqlen, "bos": p.bos, "n_tokens": res["n_tokens"],
             "n_windows": res["n_windows"], "max_windows": p.max_windows, "split": "eval", "source": source,
             "convention": "gptq: text tokenized once, windows of seqlen (BOS first if bos), mean NLL of all predicted tokens"}
    return res, proto


def _base_record(cfg, lm, run_id: str, defining: dict) -> dict:
    from hydra.core.hydra_config import HydraConfig

    sweep = cfg.sweep
    if sweep is None and HydraConfig.initialized():
        hc = HydraConfig.get()
        sweep = Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else None
    return {
        "run_id": run_id, "status": "running", "method": cfg.method.name, "bits": cfg.bits, "model": lm.name,
        "model_info": {k: v for k, v in lm.info.items() if k != "train_log"}, "model_fingerprint": lm.fingerprint,
        "head": cfg.head.name, "bpw": None, "bpw_model": None, "ppl": {}, "zeroshot": {}, "speed": {},
        "protocol": {}, "calib": None, "timing": {}, "peak_rss_mb": None, "versions": versions(),
        "device": device_info(), "seed": cfg.seed, "sweep": sweep, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": defining,
    }
