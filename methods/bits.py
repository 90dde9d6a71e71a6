"""Bits per weight, counted from what is stored (`stored_bits()` of quantized layers and the
storage dtype of everything else), never from a formula beside it."""
from __future__ import annotations

from torch import nn

from ttvq_methods.checkpoint import DTYPES, quantized_layers


def _dtype_bits(name: str) -> int:
    return DTYPES[name].itemsize * 8


def count_bits(model: nn.Module, storage_dtype: str = "float16") -> dict:
    """bpw: the decoder blocks' linear layers (every stored bit of codes, codebooks, scales,
    biases over their weight count). bpw_model: every stored bit of the whole model (embeddings,
    norms and head included; tied tensors once) over its parameter count."""
    sbits = _dtype_bits(storage_dtype)
    q = quantized_layers(model)
    blocks = model.model.layers
    lin_bits = lin_weights = 0
    for bi, block in enumerate(blocks):
        for name, m in block.named_modules():
            full = f"model.layers.{bi}.{name}"
            if full in q:
                lin_bits += q[full].stored_bits()
                lin_weights += q[full].n_weights
            elif isinstance(m, nn.Linear):
                lin_bits += sum(p.numel() for p in m.parameters()) * sbits
                lin_weights += m.weight.numel()

    # Whole model: unique parameters; quantized layers replace their weights by stored bits.
    model_bits = model_params = 0
    for m in q.values():
        model_bits += m.stored_bits()
        model_params += m.n_weights + (m.out_features if m.has_bias else 0)
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
        "counts": "bpw: decoder-block linears (codes+codebooks+scales+biases)/weights; "
                  f"bpw_model: all stored bits/all params (unquantized at {storage_dtype}, tied once)",
    }
