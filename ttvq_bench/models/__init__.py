"""Model loaders by `model.kind`; each returns a LoadedModel (transformers causal LM + tokenizer)."""
from __future__ import annotations

import torch

from ttvq_bench.errors import ConfigError
from ttvq_bench.models.base import LoadedModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tiny(mcfg, cache, progress):
    from omegaconf import OmegaConf

    from ttvq_bench.models.tiny import load_tiny

    return load_tiny(OmegaConf.to_object(mcfg.tiny), cache, progress=progress)


def _llama2c(mcfg, cache, progress):
    from ttvq_bench.models.llama2c import load_llama2c

    return load_llama2c(mcfg.path, mcfg.tokenizer, dtype=_DTYPES[mcfg.dtype])


def _hf(mcfg, cache, progress):
    from ttvq_bench.models.hf import load_hf

    return load_hf(mcfg.path, dtype=_DTYPES[mcfg.dtype], trust_remote_code=mcfg.trust_remote_code)


LOADERS = {"tiny": _tiny, "llama2c": _llama2c, "hf": _hf}


def load_model(mcfg, cache, progress: bool = True) -> LoadedModel:
    if mcfg.kind not in LOADERS:
        raise ConfigError(f"model.kind={mcfg.kind!r} is not one of {sorted(LOADERS)}")
    lm = LOADERS[mcfg.kind](mcfg, cache, progress)
    # Frozen by default; methods that train switch on exactly what they train.
    lm.model.to(_DTYPES[mcfg.dtype]).eval().requires_grad_(False)
    if mcfg.name:
        lm.name = mcfg.name
    return lm
