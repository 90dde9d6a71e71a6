"""The block-wise quantization loop every calibrated method runs (GPTQ's `*_sequential`).

For each decoder block in order: its inputs come from the already-quantized blocks before it;
per-linear input Hessians are collected on the fly (true-sequential: q/k/v first, then o,
then gate/up, then down, each group seeing the quantized outputs of the groups before it);
the method quantizes each linear; an optional block fine-tuning stage runs against the
full-precision block's outputs; the block's outputs become the next block's inputs. Memory
stays at one block plus the calibration activations. After each block its state and the next
inputs are written to a resume directory, so a killed job restarts from the last finished block.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ttvq_bench.hashing import hash_obj, hash_tensors
from ttvq_bench.errors import QuantizationError
from ttvq_methods.checkpoint import load_module_state, save_module_state, set_module
from ttvq_methods.hessian import HessianAccumulator
from ttvq_methods.layers import QuantizedLinear

# Llama/Mistral/Qwen2 names; linears of other architectures fall into one final group.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class _StopForward(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def linear_groups(block: nn.Module, true_sequential: bool) -> list[list[str]]:
    names = list(linears(block))
    if not true_sequential:
        return [names]
    groups = [[n for n in g if n in names] for g in SEQUENTIAL_GROUPS]
    rest = [n for n in names if not any(n in g for g in groups)]
    return [g for g in groups + [rest] if g]


class BlockInputs:
    """Calibration activations entering a block, plus the kwargs the model passes every block
    (rotary embeddings, mask), captured once per batch size."""

    def __init__(self, hidden: torch.Tensor, kwargs_by_bs: dict[int, dict], batch_size: int):
        self.hidden = hidden  # (n, seqlen, hidden) on CPU
        self.kwargs_by_bs = kwargs_by_bs
        self.batch_size = batch_size

    def batches(self):
        for i in range(0, len(self.hidden), self.batch_size):
            h = self.hidden[i : i + self.batch_size]
            yield i, h, self.kwargs_by_bs[len(h)]


@torch.no_grad()
def capture_inputs(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> BlockInputs:
    layer0 = decoder_layers(model)[0]
    hidden, kw_by_bs = [], {}

    def hook(_mod, args, kwargs):
        hidden.append(args[0].detach().cpu() if args else kwargs["hidden_states"].detach().cpu())
        kw = {k: v for k, v in kwargs.items() if k in ("attention_mask", "position_ids", "position_embeddings", "cache_position")}
        kw_by_bs.setdefault(hidden[-1].shape[0], kw)
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(calib_ids), batch_size):
            try:
                model(input_ids=calib_ids[i : i + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return BlockInputs(torch.cat(hidden), kw_by_bs, batch_size)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
    out = torch.empty_like(inputs.hidden)
    for i, h, kw in inputs.batches():
        y = block(h, **kw)
        out[i : i + len(h)] = y[0] if isinstance(y, tuple) else y
    return out


HESSIAN_VERSION = 1  # bump when the Hessian definition changes (it is part of the cache key)


@torch.no_grad()
def cached_hessians(block: nn.Module, names: list[str], inputs: BlockInputs, cache, inputs_hash: str) -> dict[str, torch.Tensor]:
    """Hessians keyed by what determines them: the block's inputs, the block's current weights
    (earlier groups may already be quantized) and the layer names. Jobs that share these
    (block 0 of every method on one model and calibration set, say) compute them once."""
    if cache is None or not cache.enabled:
        return collect_hessians(block, names, inputs)
    key = hash_obj({"inputs": inputs_hash, "block": hash_tensors(block.state_dict().items()), "names": names,
                    "v": HESSIAN_VERSION})

    def build(tmp):
        save_file({n: h.contiguous() for n, h in collect_hessians(block, names, inputs).items()}, str(tmp / "H.safetensors"))

    path = cache.get_or_create("hessians", key, build) / "H.safetensors"
    return load_file(str(path))


@torch.no_grad()
def collect_hessians(block: nn.Module, names: list[str], inputs: BlockInputs) -> dict[str, torch.Tensor]:
    mods = linears(block)
    accs = {n: HessianAccumulator(mods[n].in_features, device=mods[n].weight.device) for n in names}
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: accs[n].add_batch(a[0])) for n in names]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: a.hessian() for n, a in accs.items()}


def quantize_blockwise(model: nn.Module, calib_ids: torch.Tensor, method, *, batch_size: int = 8,
                       resume_dir: Path | None = None, cache=None, progress: bool = True) -> dict:
    """Quantize every decoder block of `model` in place; returns per-layer stats."""
    layers = decoder_layers(model)
    true_seq = bool(getattr(method.cfg, "true_sequential", True))
    inputs = capture_inputs(model, calib_ids, batch_size)
    prepare = getattr(method, "prepare_model", None)
    if prepare is not None:
        # Optional hook, before any block changes (and before a resume loads finished blocks):
        # e.g. codebooks shared by several blocks are fitted here. It must not modify `inputs`.
        prepare(model, inputs)
    stats: dict = {"layers": {}, "resumed_blocks": 0}
    start = 0
    if resume_dir is not None:
        resume_dir.mkdir(parents=True, exist_ok=True)
        start = _resume(layers, inputs, resume_dir, stats)
    bar = tqdm(range(len(layers)), desc=f"quantize[{method.name}]", disable=not progress, initial=start)
    for b in range(start, len(layers)):
        block = layers[b]
        t0 = time.time()
        targets = run_block(block, inputs) if getattr(method, "wants_block_targets", False) else None
        inputs_hash = hash_tensors([("x", inputs.hidden)]) if method.needs_hessian and cache is not None else ""
        for group in linear_groups(block, true_seq):
            H = cached_hessians(block, group, inputs, cache, inputs_hash) if method.needs_hessian else {}
            for name in group:
                lin = linears(block)[name]
                full = f"model.layers.{b}.{name}"
                q = method.quantize_layer(full, lin, H.get(name))
                if q is None:
                    continue
                stats["layers"][full] = _check_layer(full, lin, q)
                set_module(block, name, q)
        if targets is not None:
            method.finetune_block(block, inputs, targets, inputs.kwargs_by_bs)
        inputs.hidden = run_block(block, inputs)
        if not torch.isfinite(inputs.hidden).all():
            raise QuantizationError(f"block {b}: outputs have NaN/Inf after quantization")
        if resume_dir is not None:
            _save_block(block, inputs.hidden, stats, resume_dir, b)
        bar.update(1)
        bar.set_postfix(block=b, s=f"{time.time() - t0:.1f}")
    bar.close()
    return stats


@torch.no_grad()
def _check_layer(full: str, lin: nn.Linear, q: nn.Module) -> dict:
    w = q.dequantize() if isinstance(q, QuantizedLinear) else q.weight
    if w.shape != lin.weight.shape:
        raise QuantizationError(f"{full}: quantized weight has shape {tuple(w.shape)}, expected {tuple(lin.weight.shape)}")
    if not torch.isfinite(w).all():
        raise QuantizationError(f"{full}: quantized weight has NaN/Inf")
    ref = lin.weight.float()
    return {"rel_err": float((w.float() - ref).norm() / ref.norm().clamp_min(1e-12)),
            "bpw": q.bpw() if isinstance(q, QuantizedLinear) else 16.0}


def _save_block(block, hidden, stats, resume_dir: Path, b: int) -> None:
    tmp = resume_dir / f".tmp-block{b}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_module_state(block, tmp / "block.safetensors", extra={"stats": stats["layers"]})
    torch.save(hidden, tmp / "next_inputs.pt")
    final = resume_dir / f"block{b}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the block counts as done only once this rename happened


def _resume(layers, inputs: BlockInputs, resume_dir: Path, stats: dict) -> int:
    done = 0
    while (resume_dir / f"block{done}").is_dir() and done < len(layers):
        done += 1
    if done == 0:
        return 0
    for b in range(done):
        extra = load_module_state(layers[b], resume_dir / f"block{b}" / "block.safetensors")
        stats["layers"].update(extra.get("stats", {}))
    inputs.hidden = torch.load(resume_dir / f"block{done - 1}" / "next_inputs.pt")
    stats["resumed_blocks"] = done
    return done
