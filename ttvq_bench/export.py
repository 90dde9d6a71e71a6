"""Quantized checkpoints outside the harness.

    from ttvq_bench.export import load_quantized
    lm = load_quantized("~/.cache/ttvq/quantized/<key>/model.safetensors")   # LoadedModel
    lm.model(input_ids=...)        # the quantized layers as the harness evaluates them

    python -m ttvq_bench.export checkpoint=PATH out=DIR [dtype=float32] [model.path=...]
    ttvq-bench export checkpoint=PATH out=DIR

`export` writes a standard transformers directory whose weights are the quantized model's,
dequantized (so `AutoModelForCausalLM.from_pretrained(DIR)`, lm-eval's CLI, vLLM or any tool
evaluates exactly what the harness evaluated), plus the tokenizer when it has a transformers
form. The base model is loaded from the checkpoint's own record of it (`model_config`); a
`model.KEY=VALUE` argument overrides a field (the path on another machine), and the model's
fingerprint must match the checkpoint's.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from ttvq_bench.dtypes import TORCH_DTYPES
from ttvq_bench.errors import DataError, TTVQError
from ttvq_bench.models import load_model
from ttvq_bench.models.base import LoadedModel
from ttvq_bench.record.cache import Cache
from ttvq_methods.checkpoint import load_module_state, quantized_layers, read_meta, round_to_storage
from ttvq_methods.model_walk import set_module


def load_quantized(path: str | Path, model_overrides: dict | None = None, cache_dir: str | None = None) -> LoadedModel:
    """The model a checkpoint was quantized from, with the checkpoint's quantized layers in it."""
    path = Path(path).expanduser()
    ex = read_meta(path).get("extra", {})
    if "model_config" not in ex:
        raise DataError(f"checkpoint {path} does not record how to load its base model (written before model_config)")
    from ttvq_bench.config import ModelConfig

    mcfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), ex["model_config"], model_overrides or {})
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ttvq"  # config.py's default
    lm = load_model(mcfg, Cache(cache_dir or default_cache), progress=False)
    if lm.fingerprint != ex["model_fingerprint"]:
        raise DataError(f"{path} was quantized from model fingerprint {ex['model_fingerprint']}, "
                        f"the model loaded is {lm.fingerprint}")
    round_to_storage(lm.model, ex.get("storage_dtype", "float16"))
    load_module_state(lm.model, path)
    return lm


@torch.no_grad()
def dequantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` with every quantized layer replaced by a plain nn.Linear of its weights."""
    for name, q in quantized_layers(model).items():
        lin = nn.Linear(q.in_features, q.out_features, bias=q.has_bias, dtype=dtype)
        lin.weight.copy_(q.dequantize())
        if q.has_bias:
            lin.bias.copy_(q.bias_for_forward().float())
        set_module(model, name, lin)
    return model.to(dtype)


def export(checkpoint: str | Path, out: str | Path, dtype: str = "float32", model_overrides: dict | None = None,
           cache_dir: str | None = None) -> Path:
    lm = load_quantized(checkpoint, model_overrides, cache_dir)
    out = Path(out).expanduser()
    model = dequantized(lm.model, TORCH_DTYPES[dtype])
    model.save_pretrained(out, safe_serialization=True)
    hf_tok = getattr(lm.tokenizer, "hf", None)
    if hf_tok is not None:
        hf_tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    try:
        if "checkpoint" not in args or "out" not in args:
            raise DataError("usage: python -m ttvq_bench.export checkpoint=PATH out=DIR [dtype=float32] [model.KEY=VALUE ...]")
        model = {k[len("model."):]: v for k, v in args.items() if k.startswith("model.")}
        out = export(args["checkpoint"], args["out"], args.get("dtype", "float32"), model, args.get("cache_dir"))
    except TTVQError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
