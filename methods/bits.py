"""Bits per weight, counted from what is stored (`stored_bits()` of quantized layers and the
storage dtype of everything else), never from a formula beside it."""
from __future__ import annotations

from torch import nn

from ttvq_bench.dtypes import TORCH_DTYPES
from ttvq_methods.checkpoint import quantized_layers
from ttvq_methods.model_walk import decoder_layers, layer_name


def _dtype_bits(name: str) -> int:
    return TORCH_DTYPES[name].itemsize * 8


def _unique_bits(layer, seen: set, by_buffer: dict | None = None) -> int:
    """Stored bits of a quantized layer's buffers, skipping tensors already counted: a codebook
    shared by several layers is one tensor and is counted once (same key as the checkpoint's
    storage dedupe). For unshared layers this is exactly stored_bits()."""
    bits = 0
    for name, t in layer.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() == 0 or key in seen:
            continue
        seen.add(key)
        b = t.numel() * t.element_size() * 8
        bits += b
        if by_buffer is not None:
            by_buffer[name] = by_buffer.get(name, 0) + b
    return bits


def count_bits(model: nn.Module, storage_dtype: str = "float16") -> dict:
    """bpw: the decoder blocks' linear layers (every stored bit of codes, codebooks, scales,
    biases over their weight count). bpw_model: every stored bit of the whole model (embeddings,
    norms and head included; tied tensors once) over its parameter count."""
    sbits = _dtype_bits(storage_dtype)
    q = quantized_layers(model)
    lin_bits = lin_weights = 0
    seen_lin: set = set()
    by_buffer: dict[str, int] = {}
    for bi, block in enumerate(decoder_layers(model)):
        for name, m in block.named_modules():
            full = layer_name(bi, name)
            if full in q:
                lin_bits += _unique_bits(q[full], seen_lin, by_buffer)
                lin_weights += q[full].n_weights
            elif isinstance(m, nn.Linear):
                lin_bits += sum(p.numel() for p in m.parameters()) * sbits
                lin_weights += m.weight.numel()

    # Whole model: unique parameters; quantized layers replace their weights by stored bits.
    model_bits = model_params = 0
    seen_model: set = set()
    for m in q.values():
        model_bits += _unique_bits(m, seen_model)
        model_params += m.n_params
    # Parameters a quantized layer owns (trainable codebooks, say) are in its stored_bits already.
    seen = {p.data_ptr() for m in q.values() for p in m.parameters()}
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        model_bits += p.numel() * sbits
        model_params += p.numel()
    return {
        "bpw": lin_bits / lin_weights,
        "bpw_model": model_bits / model_params,
        "linear_bits": lin_bits,
        "linear_weights": lin_weights,
        "model_bits": model_bits,
        "model_params": model_params,
        "n_quantized_layers": len(q),
        "linear_bits_by_buffer": by_buffer,  # e.g. codes vs codebook vs scales, shared tensors once
        "counts": "bpw: decoder-block linears (codes+codebooks+scales+biases)/weights; "
                  f"bpw_model: all stored bits/all params (unquantized at {storage_dtype}, tied once)",
    }
