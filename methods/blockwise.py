"""The block-wise quantization loop every calibrated method runs (GPTQ's `*_sequential`).

For each decoder block in order: its inputs come from the already-quantized blocks before it;
per-linear input Hessians are collected on the fly (true-sequential: q/k/v first, then o,
then gate/up, then down, each group seeing the quantized outputs of the groups before it);
the method quantizes each linear; the method's block stage (`finetune_block`) runs; the
block's outputs become the next block's inputs. Memory stays at one block plus the
calibration activations (plus the teacher, when the method asks for one). After each block
its state and the next inputs are written to a resume directory, so a killed job restarts
from the last finished block.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ttvq_bench.distributed import broadcast, group
from ttvq_bench.errors import QuantizationError
from ttvq_bench.faults import fault_point
from ttvq_bench.hashing import hash_file, hash_tensors
from ttvq_bench.record.cache import tmp_prefix
from ttvq_methods.base import BlockContext, Method
from ttvq_methods.checkpoint import load_module_state, save_module_state
from ttvq_methods.layers import QuantizedLinear
from ttvq_methods.model_walk import (BlockInputs, block_name, capture_inputs, decoder_layers, layer_name,
                                     linear_groups, linears, on_device, run_block, set_module)
from ttvq_methods.second_order import cached_hessians
from ttvq_methods.teacher import Teacher

log = logging.getLogger(__name__)


def quantize_blockwise(model: nn.Module, calib_ids: torch.Tensor, method: Method, *, batch_size: int = 8,
                       resume_dir: Path | None = None, save_resume: bool = True, cache=None, progress: bool = True,
                       device: torch.device | None = None) -> dict:
    """Quantize every decoder block of `model` in place, then run the method's end-to-end
    stage; returns per-layer stats. The model stays where it is (host memory); with `device`
    each block moves there while it is quantized, with its activations in batches: device
    memory is one block, one batch of activations and the method's state for that block."""
    layers = decoder_layers(model)
    inputs = capture_inputs(model, calib_ids, batch_size, device)
    request = method.teacher_request()
    teacher = Teacher(model, inputs, request, device) if request is not None else None
    method.prepare(model, inputs, teacher)
    stats: dict = {"layers": {}, "blocks": {}, "resumed_blocks": 0}
    start = 0
    if resume_dir is not None:
        if save_resume:  # else (a torchrun rank other than 0) only read, what rank 0 saved
            resume_dir.mkdir(parents=True, exist_ok=True)
        start = _resume(layers, inputs, resume_dir, stats)
    bar = tqdm(range(len(layers)), desc=f"quantize[{method.name}]", disable=not progress, initial=start)
    for b in range(start, len(layers)):
        fault_point(f"block{b}")
        t0 = time.time()
        with on_device(layers[b], device) as block:
            _quantize_block(b, block, model, method, inputs, teacher, stats, cache)
        if resume_dir is not None and save_resume:
            _save_block(layers[b], inputs.hidden, stats, resume_dir, b)
        bar.update(1)
        bar.set_postfix(block=b, s=f"{time.time() - t0:.1f}")
        log.info("block %d/%d quantized in %.1f s", b + 1, len(layers), time.time() - t0)
    bar.close()
    method.finalize(model, calib_ids, teacher)
    return stats


def _quantize_block(b: int, block: nn.Module, model: nn.Module, method: Method, inputs: BlockInputs, teacher,
                    stats: dict, cache) -> None:
    """Quantize block b's linears group by group, run the method's block stage, and advance
    `inputs` to the next block's. The seconds each stage took go to stats["blocks"][b]."""
    clock = _Clock()
    with clock("targets_s"):
        targets = run_block(block, inputs) if method.needs_block_targets else None
    fp_weights = {n: lin.weight for n, lin in linears(block).items()}  # the originals stay untouched
    inputs_hash = hash_tensors([("x", inputs.hidden)]) if method.needs_hessian and cache is not None else ""
    for names in linear_groups(block, method.true_sequential):
        with clock("hessian_s"):
            H = cached_hessians(block, names, inputs, cache, inputs_hash) if method.needs_hessian else {}
        for name, q in _quantize_group(b, block, names, H, method, clock).items():
            if q is None:
                continue
            stats["layers"][layer_name(b, name)] = _check_layer(layer_name(b, name), linears(block)[name], q)
            set_module(block, name, q)
    with clock("finetune_s"):
        method.finetune_block(BlockContext(index=b, name=block_name(b), block=block, model=model, inputs=inputs,
                                           targets=targets, fp_weights=fp_weights, teacher=teacher))
    with clock("forward_s"):
        inputs.hidden = run_block(block, inputs)
    if not torch.isfinite(inputs.hidden).all():
        raise QuantizationError(f"block {b}: outputs have NaN/Inf after quantization")
    stats.setdefault("blocks", {})[str(b)] = clock.seconds


def _quantize_group(b: int, block: nn.Module, names: list[str], H: dict, method: Method, clock) -> dict:
    """The quantized replacements of one group's linears (None: kept). Under torchrun, with a
    method whose linears are independent (`parallel_layers`), process r quantizes the linears
    i with i % world == r, then each is sent from its owner to every process."""
    rank, world = group()
    lins = linears(block)
    owner = {name: (i % world if world > 1 and method.parallel_layers else rank) for i, name in enumerate(names)}
    out = {}
    for name in names:
        if owner[name] == rank:
            with clock("quantize_s"):
                out[name] = method.quantize_layer(layer_name(b, name), lins[name], H.get(name))
    if all(o == rank for o in owner.values()):
        return out
    with clock("share_s"):
        for name in names:
            full, device = layer_name(b, name), lins[name].weight.device
            mine = owner[name] == rank
            q = out.get(name)
            state = {a: getattr(method, a)[full] for a in method.layer_state_attrs if mine and full in getattr(method, a)}
            q, state = broadcast((q.cpu() if q is not None else None, state) if mine else None, owner[name])
            if q is not None:
                method.adopt_layer(full, q, state)
                q = q.to(device)
            out[name] = q
    return out


class _Clock:
    """Wall seconds per stage, summed over repeated entries (synchronised on a GPU so the time
    lands on the stage that spent it)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.t0 = _now()

            def __exit__(self, *exc):
                clock.seconds[stage] = round(clock.seconds.get(stage, 0.0) + _now() - self.t0, 4)
                return False

        return _Stage()


def _now() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def _check_layer(full: str, lin: nn.Linear, q: nn.Module) -> dict:
    w = q.dequantize() if isinstance(q, QuantizedLinear) else q.weight
    if w.shape != lin.weight.shape:
        raise QuantizationError(f"{full}: quantized weight has shape {tuple(w.shape)}, expected {tuple(lin.weight.shape)}")
    if not torch.isfinite(w).all():
        raise QuantizationError(f"{full}: quantized weight has NaN/Inf")
    if not isinstance(q, QuantizedLinear):
        ref = lin.weight.float()
        return {"rel_err": float((w.float() - ref).norm() / ref.norm().clamp_min(1e-12)), "bpw": 16.0}
    return {"rel_err": q.rel_err(lin.weight), "bpw": q.bpw()}


def _save_block(block, hidden, stats, resume_dir: Path, b: int) -> None:
    """The block's state exactly as it is in memory (no cast: a resumed run must equal an
    uninterrupted one bit for bit) and the next block's inputs, with their hashes."""
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(f"block{b}"), dir=resume_dir))
    save_module_state(block, tmp / "block.safetensors", storage_dtype=None,
                      extra={"stats": stats["layers"], "block_seconds": stats.get("blocks", {})})
    torch.save(hidden, tmp / "next_inputs.pt")
    (tmp / "manifest.json").write_text(json.dumps({f.name: hash_file(f, n=64) for f in tmp.iterdir()}))
    final = resume_dir / f"block{b}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the block counts as done only once this rename happened


def _intact(d: Path) -> bool:
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        return bool(manifest) and all(hash_file(d / name, n=64) == sha for name, sha in manifest.items())
    except (OSError, ValueError):
        return False


def _resume(layers, inputs: BlockInputs, resume_dir: Path, stats: dict) -> int:
    """Load the finished blocks; a damaged one (and everything after it) is done again."""
    done = 0
    while done < len(layers) and (resume_dir / f"block{done}").is_dir():
        if not _intact(resume_dir / f"block{done}"):
            log.warning("resume state of block %d in %s is damaged: quantizing from block %d again", done, resume_dir, done)
            for b in range(done, len(layers)):
                shutil.rmtree(resume_dir / f"block{b}", ignore_errors=True)
            break
        done += 1
    if done == 0:
        return 0
    for b in range(done):
        extra = load_module_state(layers[b], resume_dir / f"block{b}" / "block.safetensors")
        stats["layers"].update(extra.get("stats", {}))
        stats.setdefault("blocks", {}).update(extra.get("block_seconds", {}))
    inputs.hidden = torch.load(resume_dir / f"block{done - 1}" / "next_inputs.pt")
    stats["resumed_blocks"] = done
    log.info("resumed %d finished block(s) from %s", done, resume_dir)
    return done
