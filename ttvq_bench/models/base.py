"""What every model loader returns.

The rest of the harness sees a transformers causal LM (`model.model.layers` are the decoder
blocks, `model.lm_head` the head) plus a `TextTokenizer`, whatever the checkpoint format.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class TextTokenizer(Protocol):
    """The few things the harness needs from a tokenizer.

    `encode` never adds BOS/EOS: the evaluation protocol decides where BOS goes.
    `hf` is a transformers tokenizer for libraries that need one (lm-eval), or None.
    """

    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str: ...


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM in eval mode, on CPU, fp32 by default
    tokenizer: TextTokenizer
    name: str  # short human name for records ("stories260K", "tiny", dir name)
    fingerprint: str  # content hash of weights + config: cache keys and run_id use it
    info: dict[str, Any] = field(default_factory=dict)  # format, path, n_params, ...
