"""Calibration windows: N seeded windows of seqlen tokens from a corpus's calibration split,
cached by content (tokenizer, text, n, seqlen, BOS, seed, and the sampler's code), never by
where the text lives."""
from __future__ import annotations

import logging

import torch

from ttvq_bench.data.corpora import load_text
from ttvq_bench.data.windows import calib_windows
from ttvq_bench.hashing import hash_bytes, hash_obj
from ttvq_bench.record.versions import code_hash

log = logging.getLogger("ttvq")


def calibration_ids(ccfg, tokenizer, cache) -> tuple[torch.Tensor, dict]:
    text, source = load_text(ccfg.corpus, str(ccfg.split))
    bos = tokenizer.bos_id if ccfg.bos else None
    info = {"corpus": ccfg.corpus.name, "source": source, "text_sha": hash_bytes(text.encode()),
            "n": ccfg.n, "seqlen": ccfg.seqlen, "bos": ccfg.bos, "seed": ccfg.seed,
            "sampler": str(ccfg.sampler), "split": str(ccfg.split), "stream_start": ccfg.stream_start,
            "bos_text": ccfg.bos_text,
            "tokenizer": tokenizer.fingerprint()}
    key = hash_obj({**{k: v for k, v in info.items() if k != "source"}, "code": code_hash((__name__,))})
    info["key"] = key

    def build(tmp):
        stream = ([tokenizer.bos_id] if ccfg.bos_text else []) + tokenizer.encode(text)
        ids = calib_windows(stream, ccfg.n, ccfg.seqlen, bos, ccfg.seed, str(ccfg.sampler), ccfg.stream_start)
        torch.save(ids, tmp / "ids.pt")

    path = cache.get_or_create("calib", key, build)
    ids = torch.load(path / "ids.pt")
    log.info("calibration: %d windows of %d tokens from %s (%s)", ids.shape[0], ids.shape[1], info["corpus"], source)
    return ids, info
