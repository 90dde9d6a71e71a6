"""Kernel speed of one run's quantized model, for the record's `speed` field.

    from ttvq_kernels.speed import measure
    speed = measure(quantized_model, reference_model, prompt_ids, n_new_tokens=16)

* per layer shape: each distinct (kind, out, in) of the model's quantized layers once: the
  kernel a one-token call takes (the selector's choice on this device), its median time, and
  the dense matmul of the reference model's layer of the same name on the same input;
* end to end: greedy decoding with a KV cache, the same prompt and number of new tokens for the
  quantized and the reference model, median over repeats; tokens/s counts the decode steps
  only (the prompt's prefill is timed separately, it takes another kernel).
The models are used as they are (device, dtype, threads); nothing is changed or cached beyond
what their own forward caches. On a CPU the kernel is the torch path, so the speed-up mostly
shows the selector and caching overhead, not a kernel.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ttvq_kernels import device as devices
from ttvq_kernels.selector import kernel_name
from ttvq_kernels.timing import median_ms
from ttvq_methods.layers import QuantizedLinear
from ttvq_methods.model_walk import modules_of


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, n_new: int) -> tuple[list[int], float, float]:
    """(new token ids, prefill seconds, decode seconds for the n_new - 1 cached steps)."""
    dev = prompt.device
    _sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=prompt[None], use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(dev)
    t1 = time.perf_counter()
    ids = [int(nxt)]
    for _ in range(n_new - 1):
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids.append(int(nxt))  # int() syncs: the next step needs the token anyway
    _sync(dev)
    return ids, t1 - t0, time.perf_counter() - t1


def _decode(model, prompt: torch.Tensor, n_new: int, repeats: int) -> tuple[list[int], float, float]:
    runs = [greedy(model, prompt, n_new) for _ in range(repeats + 1)][1:]  # the first warms caches up
    return runs[0][0], statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)


@torch.no_grad()
def layer_speed(model, reference, repeats: int = 10) -> list[dict]:
    """Per distinct (kind, out, in) of `model`'s quantized layers: kernel at one token, median ms,
    the reference layer's dense matmul ms, speed-up."""
    groups: dict[tuple, list[str]] = {}
    for name, q in modules_of(model, QuantizedLinear).items():
        groups.setdefault((q.kind, q.out_features, q.in_features), []).append(name)
    rows = []
    for (kind, out_f, in_f), names in groups.items():
        q = model.get_submodule(names[0])
        dense = reference.get_submodule(names[0])
        dev = next(q.buffers()).device
        x = torch.randn(1, in_f, device=dev, dtype=_act_dtype(model))
        ms, how = median_ms(lambda: q(x), dev, repeats=repeats)
        xr = x.to(device=dense.weight.device, dtype=dense.weight.dtype)
        dense_ms, _ = median_ms(lambda: F.linear(xr, dense.weight, dense.bias), dense.weight.device, repeats=repeats)
        rows.append({"kind": kind, "shape": [out_f, in_f], "n_layers": len(names), "kernel": kernel_name(q, x),
                     "ms": round(ms, 4), "dense_ms": round(dense_ms, 4), "speedup": round(dense_ms / ms, 3),
                     "cuda_graph": how["cuda_graph"], "l2_flushed": how["l2_flushed"]})
    return rows


def _act_dtype(model) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.float32 if p is None else p.dtype


def measure(model, reference, prompt_ids, n_new_tokens: int = 16, *, repeats: int = 3,
            layer_repeats: int = 10) -> dict:
    """The `speed` record of a quantized causal LM against its full-precision reference.

    model, reference: transformers causal LMs (the quantized one holds QuantizedLinear layers;
    the reference has nn.Linear layers under the same names), in eval mode. prompt_ids: 1-D
    token ids (e.g. [bos] or [bos] + a short text), on any device (moved to each model's).
    Returns {"device", "dtype", "threads", "layers": [...], "decode": {...}} (docs/kernels.md)."""
    dev = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    layers = layer_speed(model, reference, layer_repeats)
    q_ids, q_pre, q_dec = _decode(model, prompt.to(dev), n_new_tokens, repeats)
    r_ids, r_pre, r_dec = _decode(reference, prompt.to(next(reference.parameters()).device), n_new_tokens, repeats)
    steps = n_new_tokens - 1
    kernels: dict[str, int] = {}
    for row in layers:
        kernels[row["kernel"]] = kernels.get(row["kernel"], 0) + row["n_layers"]
    return {
        "device": devices.name(dev), "dtype": str(_act_dtype(model)).removeprefix("torch."),
        "threads": torch.get_num_threads(), "layers": layers,
        "decode": {
            "prompt_tokens": int(prompt.numel()), "new_tokens": n_new_tokens, "repeats": repeats,
            "kernels": kernels,  # kernel -> number of quantized layers taking it at one token
            "tokens_per_s": round(steps / q_dec, 2) if steps and q_dec > 0 else None,
            "reference_tokens_per_s": round(steps / r_dec, 2) if steps and r_dec > 0 else None,
            "speedup": round(r_dec / q_dec, 3) if steps and q_dec > 0 else None,
            "prefill_ms": round(q_pre * 1e3, 3), "reference_prefill_ms": round(r_pre * 1e3, 3),
            "token_agreement": sum(a == b for a, b in zip(q_ids, r_ids)) / max(1, len(q_ids)),
        },
    }
