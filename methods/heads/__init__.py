"""The output-head stage: what happens to the LM head (and, when tied, the input embedding)
after the decoder blocks are quantized. A head is a config dataclass plus a subclass of
`Head`, registered by name in HEADS; `head=<name>` selects it (conf/head/<name>.yaml).

    h = HEADS.get(name)(cfg)
    h.storage_dtype = cfg.model.storage_dtype   # what unquantized tensors are stored at (the head's bits before)
    h.prepare(model, calib_ids)          # the full-precision model, before the body is quantized (fresh quantizations)
    report = h.apply(model, calib_ids)   # calib_ids is None when h.needs_calibration is False

The record's `bpw_model` counts whatever the head stage leaves in the model.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ttvq_bench.registry import Registry


class Head:
    name: ClassVar[str] = ""
    Config: ClassVar[type]
    needs_calibration: ClassVar[bool] = False

    storage_dtype: str = "float16"  # model.storage_dtype, set by the run

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def prepare(self, model: nn.Module, calib_ids: torch.Tensor | None) -> None:
        """Called with the full-precision model before the body is quantized or loaded from the
        cache (e.g. to keep FP hidden states for a teacher); a quantization found whole in the
        cache calls neither this nor apply."""

    def apply(self, model: nn.Module, calib_ids: torch.Tensor | None) -> dict:
        """Change the model's head in place; returns extras for the record."""
        raise NotImplementedError


def _discover() -> None:
    from ttvq_methods.registry import import_method_modules

    import_method_modules()


HEADS: Registry[type[Head]] = Registry("head", Head, discover=_discover, name_attr="name")
