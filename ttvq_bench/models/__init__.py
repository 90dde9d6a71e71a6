"""Model loaders by `model.kind`; each returns a LoadedModel (transformers causal LM + tokenizer)."""
from __future__ import annotations

import torch

from ttvq_bench.dtypes import TORCH_DTYPES
from ttvq_bench.errors import DataError
from ttvq_bench.models.base import LoadedModel
from ttvq_bench.registry import Registry

LOADERS: Registry = Registry("model kind")


def _dtype(mcfg) -> torch.dtype:
    """The compute dtype (auto: as on a CPU; run_job resolves it for its device first)."""
    from ttvq_bench.device import resolve_dtype

    return TORCH_DTYPES[resolve_dtype(mcfg.dtype, torch.device("cpu"))]


@LOADERS.register("tiny")
def _tiny(mcfg, cache, progress):
    from omegaconf import OmegaConf

    from ttvq_bench.models.tiny import load_tiny

    return load_tiny(OmegaConf.to_object(mcfg.tiny), cache, progress=progress)


@LOADERS.register("llama2c")
def _llama2c(mcfg, cache, progress):
    from ttvq_bench.models.llama2c import load_llama2c

    return load_llama2c(mcfg.path, mcfg.tokenizer, dtype=_dtype(mcfg))


@LOADERS.register("hf")
def _hf(mcfg, cache, progress):
    from ttvq_bench.models.hf import load_hf

    return load_hf(mcfg.path, dtype=_dtype(mcfg), trust_remote_code=mcfg.trust_remote_code)


def load_model(mcfg, cache, progress: bool = True) -> LoadedModel:
    lm = LOADERS.get(mcfg.kind)(mcfg, cache, progress)
    for name, p in lm.model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise DataError(f"model {lm.name}: parameter {name} holds NaN/Inf; the weights are damaged")
    # Frozen by default; methods that train switch on exactly what they train.
    lm.model.to(_dtype(mcfg)).eval().requires_grad_(False)
    if mcfg.name:
        lm.name = mcfg.name
    return lm
