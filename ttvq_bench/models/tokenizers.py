"""Tokenizer adapters with one small interface (`ttvq_bench.models.base.TextTokenizer`)."""
from __future__ import annotations

import json
from pathlib import Path

from ttvq_bench.errors import DataError
from ttvq_bench.hashing import hash_bytes, hash_file


class HFTokenizer:
    """Wraps a transformers tokenizer. `encode` adds no special tokens."""

    def __init__(self, tok):
        self.hf = tok
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    def fingerprint(self) -> str:
        backend = getattr(self.hf, "backend_tokenizer", None) or getattr(self.hf, "_tokenizer", None)
        if backend is not None:
            return hash_bytes(backend.to_str().encode())
        return hash_bytes(json.dumps(sorted(self.hf.get_vocab().items())).encode())


class SentencePieceTokenizer:
    """Reads a SentencePiece model with the `sentencepiece` package (transformers' slow
    LlamaTokenizer returned empty ids for llama2.c's tok512.model)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.vocab_size = self.sp.get_piece_size()
        self.hf = None  # a verified transformers equivalent, when one is built (lm-eval needs it)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def fingerprint(self) -> str:
        return hash_file(self.path)
