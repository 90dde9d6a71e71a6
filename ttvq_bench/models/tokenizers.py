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
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece's parse errors are RuntimeError / OSError
            raise DataError(f"{path} is not a SentencePiece model ({type(e).__name__}): give the .model file "
                            "(llama2.c's tok512.model, not tok512.bin)") from None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.vocab_size = self.sp.get_piece_size()
        # A transformers equivalent for libraries that need one (lm-eval), or None when this
        # model uses a feature the conversion does not mirror or the ids do not agree.
        self.hf = sentencepiece_to_hf(path, self.sp)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def fingerprint(self) -> str:
        return hash_file(self.path)


# Text the conversion must tokenize exactly like sentencepiece before it is used: runs of
# spaces, leading/trailing spaces, tabs and newlines, digits, byte-fallback characters, and
# control-token text (sentencepiece encodes "<s>" literally).
_CHECK_TEXT = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "  Tom  said, \"Look!\"\tThe 3 dogs ran 1,024 steps.\n\nThe end. ",
    "caf\u00e9 na\u00efve \u20ac5 \u65e5\u672c \U0001f600 <s>x</s> <unk>",
    "",
    "   ",
]


def sentencepiece_to_hf(path: str | Path, sp):
    """A `PreTrainedTokenizerFast` that encodes like the SentencePiece BPE model at `path`.

    transformers' own LlamaTokenizer returned empty ids for llama2.c's tok512.model, so the
    fast tokenizer is built here from the model proto:
    - BPE over the same vocabulary; merges ordered by the merged piece's score, which is how
      sentencepiece's BPE picks the next pair (highest-scoring piece in the vocabulary first);
      byte fallback for characters outside the vocabulary;
    - a normalizer that reproduces the normalizer_spec flags: remove_extra_whitespaces (drop
      leading/trailing spaces, collapse runs of spaces; spaces only, not tabs or newlines),
      add_dummy_prefix, and escaping spaces as U+2581;
    - `split_special_tokens=True`, because sentencepiece encodes "<s>" in text as characters;
    - a post-processor that adds BOS when asked for special tokens, like Llama tokenizers.
    Returns None for features it does not mirror (unigram models, a precompiled charsmap,
    whitespace-as-suffix, user-defined pieces) or if any id differs from sentencepiece on
    `_CHECK_TEXT`; the tests also compare it on real TinyStories and WikiText text.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    m = pb.ModelProto()
    m.ParseFromString(Path(path).read_bytes())
    ts, ns = m.trainer_spec, m.normalizer_spec
    NORMAL, USER_DEFINED = 1, 4
    if (
        ts.model_type != pb.TrainerSpec.BPE
        or ns.precompiled_charsmap
        or ts.treat_whitespace_as_suffix
        or any(p.type == USER_DEFINED for p in m.pieces)
    ):
        return None

    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    # Only normal pieces are produced by merging (not bytes, control or unknown pieces).
    merged = sorted((-p.score, i, p.piece) for i, p in enumerate(m.pieces) if p.type == NORMAL)
    merges = [
        (piece[:k], piece[k:])
        for _, _, piece in merged
        for k in range(1, len(piece))
        if piece[:k] in vocab and piece[k:] in vocab
    ]
    unk = m.pieces[ts.unk_id].piece
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=ts.byte_fallback)
    )
    norm = []
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norm.append(normalizers.Prepend("\u2581"))
    if ns.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)

    special = {}
    for name, idx in (("bos_token", ts.bos_id), ("eos_token", ts.eos_id), ("unk_token", ts.unk_id), ("pad_token", ts.pad_id)):
        if 0 <= idx < len(m.pieces):
            special[name] = m.pieces[idx].piece
    if "bos_token" in special:
        bos = special["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ts.bos_id)]
        )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, split_special_tokens=True, **special)

    for text in _CHECK_TEXT:
        if hf.encode(text, add_special_tokens=False) != sp.encode(text):
            return None
    return hf
