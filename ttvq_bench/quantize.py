"""What a job quantizes with, and doing it: the method and head the config names, or the
identity a given checkpoint carries.

`Quantization.resolve(cfg)` runs before any work. With `checkpoint=PATH` the file's own
metadata says what it is (method, bits, method config, head, calibration, model): the record
takes its identity from there, and a command line that names another method, bits or method
setting is refused with one line. `run()` then quantizes in place (or loads the checkpoint, or
the cached quantization of this exact key) and returns the record's `quantize` block, which
keeps the per-layer stats and the method's report whichever way the weights came.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ttvq_bench.data.calib import calibration_ids
from ttvq_bench.device import batch_size_for
from ttvq_bench.errors import ConfigError, DataError, QuantizationError
from ttvq_bench.hashing import hash_obj
from ttvq_bench.record.versions import code_hash
from ttvq_methods.blockwise import quantize_blockwise
from ttvq_methods.checkpoint import load_module_state, read_meta, round_to_storage, save_module_state
from ttvq_methods.heads import HEADS
from ttvq_methods.registry import METHODS

log = logging.getLogger("ttvq")


@dataclass
class Quantization:
    method_name: str
    bits: int
    method_config: dict  # plain JSON values
    head_name: str
    head_config: dict
    method: Any = None  # the Method instance (None for checkpoint= runs)
    head: Any = None
    checkpoint: str | None = None  # checkpoint= path
    checkpoint_meta: dict = field(default_factory=dict)  # its metadata (extra: the identity it was written with)

    @classmethod
    def resolve(cls, cfg) -> "Quantization":
        if cfg.checkpoint:
            return cls._from_checkpoint(cfg)
        method_cls = METHODS.get(cfg.method.name)
        bits = method_cls.fixed_bits if method_cls.fixed_bits is not None else cfg.bits
        method = method_cls(OmegaConf.to_object(cfg.method), bits)  # rejects what it cannot do
        head = HEADS.get(cfg.head.name)(OmegaConf.to_object(cfg.head))
        head.storage_dtype = str(cfg.model.storage_dtype)
        return cls(cfg.method.name, bits, _plain(cfg.method), cfg.head.name, _plain(cfg.head), method, head)

    @classmethod
    def _from_checkpoint(cls, cfg) -> "Quantization":
        path = str(cfg.checkpoint)
        meta = read_meta(path)  # a missing or unreadable file fails here, before the model loads
        ex = meta.get("extra", {})
        if not {"method", "bits", "method_config", "model_fingerprint"} <= set(ex):
            raise DataError(f"checkpoint {path}: it does not say what produced it (not written by a ttvq-bench run)")
        head = ex.get("head", "keep")
        _refuse_contradictions(cfg, path, ex["method"], ex["bits"], ex["method_config"], head)
        return cls(ex["method"], ex["bits"], ex["method_config"], head, ex.get("head_config", {"name": head}),
                   checkpoint=path, checkpoint_meta=meta)

    @property
    def needs_calibration(self) -> bool:
        return self.checkpoint is None and (self.method.needs_calibration or self.head.needs_calibration)

    def code_roots(self, head_module: str | None = None) -> tuple[str, ...]:
        """Modules whose code decides the quantized weights (record/versions.py follows their imports)."""
        if self.checkpoint:
            return ()
        return ("ttvq_methods.blockwise", *self.method.modules(), head_module or type(self.head).__module__)

    def key(self, lm, calib_info: dict, cfg, head: tuple[dict, str] | None = None) -> str:
        """The cache key of this exact quantization: content and code, never paths. `head`:
        (head config, head module) instead of this job's (the body's key: see _body)."""
        head_config, head_module = head or (self.head_config, None)
        return hash_obj({"model": lm.fingerprint, "calib": calib_info["key"], "method": self.method_config,
                         "head": head_config, "bits": self.bits, "dtype": cfg.model.dtype,
                         "storage": cfg.model.storage_dtype, "code": code_hash(self.code_roots(head_module))})

    # -- doing it ---------------------------------------------------------------------------------
    def run(self, cfg, lm, cache, record: dict, progress: bool, device=None) -> dict:
        """Quantize lm.model in place (or load the weights); returns the record's `quantize`."""
        if self.checkpoint:
            ex = self.checkpoint_meta["extra"]
            if ex["model_fingerprint"] != lm.fingerprint:
                raise DataError(f"checkpoint {self.checkpoint} was quantized from model {ex.get('model')!r} "
                                f"(fingerprint {ex['model_fingerprint']}), not from {lm.name!r} ({lm.fingerprint})")
            load_module_state(lm.model, self.checkpoint)
            record["calib"] = ex.get("calib")
            return {"source": "checkpoint", "checkpoint": self.checkpoint, **_quantization_report(self.checkpoint_meta)}
        if not self.needs_calibration:
            self.head.prepare(lm.model, None)
            self.head.apply(lm.model, None)
            return {"source": "none"}
        calib, calib_info = calibration_ids(cfg.calib, lm.tokenizer, cache)
        record["calib"] = calib_info
        key = self.key(lm, calib_info, cfg)
        record["checkpoint_key"] = key
        # One job quantizes a key at a time; a second one (a repeated launch, a requeue) waits
        # and then finds the finished entry.
        with cache.lock(f"quantize-{key}") if cache.enabled else _nothing():
            if (entry := cache.lookup("quantized", key)) is not None:
                path = entry / "model.safetensors"
                load_module_state(lm.model, path)
                return {"source": "cache", "checkpoint": str(path), **_quantization_report(read_meta(path))}
            return self._quantize(cfg, lm, cache, calib, calib_info, key, progress, device)

    def _quantize(self, cfg, lm, cache, calib, calib_info, key, progress, device) -> dict:
        self.head.prepare(lm.model, calib)  # the full-precision model, before the body changes
        body = self._body(cfg, lm, cache, calib, calib_info, key, progress, device)
        round_to_storage(lm.model, cfg.model.storage_dtype)  # the head stage sees the body as it is stored
        head_report = self.head.apply(lm.model, calib)
        round_to_storage(lm.model, cfg.model.storage_dtype)
        check_finite(lm.model, "the quantized model")
        report = {"layers": body["layers"], "block_seconds": body["block_seconds"], "method_report": body["method_report"],
                  "head_report": head_report}
        path = sha = None
        if cfg.save_checkpoint:
            extra = self._extra(cfg, lm, calib_info, self.head_name, self.head_config, self.code_roots(), report)
            with cache.writing("quantized", key) as tmp:
                sha = save_module_state(lm.model, tmp / "model.safetensors", cfg.model.storage_dtype, extra=extra)
            path = str(cache.path("quantized", key) / "model.safetensors")
        if body["resume"] is not None and not cache.read_only:
            shutil.rmtree(body["resume"], ignore_errors=True)
        return {"source": "quantized", "checkpoint": path, "content_sha": sha, "resumed_blocks": body["resumed_blocks"],
                **({"body": body["reuse"]} if body["reuse"] else {}), **report}

    def _extra(self, cfg, lm, calib_info, head_name, head_config, roots, report) -> dict:
        """A checkpoint's metadata: what produced it."""
        return {"method": self.method_name, "bits": self.bits, "method_config": self.method_config,
                "head": head_name, "head_config": head_config, "model": lm.name,
                "model_fingerprint": lm.fingerprint, "calib": calib_info, "storage_dtype": str(cfg.model.storage_dtype),
                "model_config": _plain(cfg.model),  # how to load the base model (load_quantized)
                "code_hash": code_hash(roots), **report}

    def _body(self, cfg, lm, cache, calib, calib_info, key, progress, device) -> dict:
        """The decoder blocks, quantized by the method. A job whose head stage is not the plain
        one (head=keep) shares its body with the head=keep job of the same quantization: the body
        is loaded from that job's cache entry when there is one, and written there when it is
        quantized here, so head variants over one body quantize it once."""
        body = {"layers": {}, "block_seconds": {}, "method_report": None, "resumed_blocks": 0, "resume": None, "reuse": None}
        if not self.method.needs_calibration:
            return {**body, "method_report": self.method.report()}
        keep = HEADS.get("keep")
        keep_config = OmegaConf.to_container(OmegaConf.structured(keep.Config()), enum_to_str=True)
        body_key = self.key(lm, calib_info, cfg, head=(keep_config, keep.__module__))
        if not cache.enabled or body_key == key:
            return {**body, **self._quantize_body(cfg, lm, cache, calib, key, progress, device)}
        with cache.lock(f"quantize-{body_key}"):
            if (entry := cache.lookup("quantized", body_key)) is not None:
                path = entry / "model.safetensors"
                load_module_state(lm.model, path)
                rep = _quantization_report(read_meta(path))
                log.info("body: the head=keep quantization from the cache (%s)", path)
                return {**body, "layers": rep.get("layers", {}), "block_seconds": rep.get("block_seconds", {}),
                        "method_report": rep.get("method_report"),
                        "reuse": {"source": "cache", "key": body_key, "checkpoint": str(path)}}
            res = self._quantize_body(cfg, lm, cache, calib, body_key, progress, device)
            if cfg.save_checkpoint:
                round_to_storage(lm.model, cfg.model.storage_dtype)  # exactly what the head=keep job stores
                check_finite(lm.model, "the quantized model")
                report = {"layers": res["layers"], "block_seconds": res["block_seconds"],
                          "method_report": res["method_report"], "head_report": {}}
                extra = self._extra(cfg, lm, calib_info, keep.name, keep_config, self.code_roots(keep.__module__), report)
                with cache.writing("quantized", body_key) as tmp:
                    save_module_state(lm.model, tmp / "model.safetensors", cfg.model.storage_dtype, extra=extra)
            return {**body, **res, "reuse": {"source": "quantized", "key": body_key}}

    def _quantize_body(self, cfg, lm, cache, calib, resume_key, progress, device) -> dict:
        resume = cache.work_dir(resume_key)  # per-block progress of this exact quantization
        bs = batch_size_for(lm.model, cfg.calib.seqlen, device or torch.device("cpu"), cfg.eval.ppl.batch_size)
        stats = quantize_blockwise(lm.model, calib, self.method, batch_size=bs,
                                   resume_dir=resume if cache.enabled else None, save_resume=not cache.read_only,
                                   cache=cache, progress=progress, device=device)
        return {"layers": stats["layers"], "block_seconds": stats.get("blocks", {}), "method_report": self.method.report(),
                "resumed_blocks": stats["resumed_blocks"], "resume": resume}


def _quantization_report(meta: dict) -> dict:
    ex = meta.get("extra", {})
    return {"content_sha": meta.get("content_sha"), "quantized_by_code": ex.get("code_hash"),
            **{k: ex[k] for k in ("layers", "block_seconds", "method_report", "head_report") if k in ex}}


@torch.no_grad()
def check_finite(model: torch.nn.Module, what: str) -> None:
    """A model with NaN/Inf anywhere is an error, never a result."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise QuantizationError(f"{what} has NaN/Inf in {name}")


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _refuse_contradictions(cfg, path: str, method: str, bits: int, method_config: dict, head: str) -> None:
    """The checkpoint decides method, bits and their settings; the command line may repeat them
    but not contradict them."""
    file_values = {"method": method, "bits": bits, "head": head,
                   **{f"method.{k}": v for k, v in method_config.items()}}
    clash = []
    for key in _explicit_keys(cfg):
        said = OmegaConf.select(cfg, "method.name" if key == "method" else "head.name" if key == "head" else key)
        said = OmegaConf.to_container(said, enum_to_str=True) if OmegaConf.is_config(said) else said
        if key not in file_values:
            clash.append(f"{key}={said} (not a setting of the checkpoint's {method})")
        elif not _same(said, file_values[key]):
            clash.append(f"{key}={said}")
    if clash:
        raise ConfigError(f"checkpoint {path} holds {method} at {bits} bits; the command line says "
                          f"{', '.join(clash)}: drop those (the checkpoint's own identity is used) or match them")


def _same(a, b) -> bool:
    return str(a) == str(b) or (isinstance(b, float) and isinstance(a, (int, float)) and float(a) == b)


def _explicit_keys(cfg) -> list[str]:
    """What the user set explicitly among method, bits, head and method.*: Hydra's task
    overrides, or (called without Hydra, as the tests do) method and bits."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ["method", "bits"]
    keys = [o.lstrip("+~").partition("=")[0] for o in HydraConfig.get().overrides.task]
    return [k for k in keys if k in ("method", "bits", "head") or k.startswith("method.")]
