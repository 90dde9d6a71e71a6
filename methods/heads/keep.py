"""head=keep: the output head and the embeddings stay unquantized at model.storage_dtype, the
convention of the VQ papers (they count the decoder blocks' linears only)."""
from __future__ import annotations

from dataclasses import dataclass

from ttvq_methods.heads import HEADS, Head


@dataclass
class KeepHeadConfig:
    name: str = "keep"


@HEADS.register("keep")
class KeepHead(Head):
    Config = KeepHeadConfig

    def apply(self, model, calib_ids) -> dict:
        return {}
