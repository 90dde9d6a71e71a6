"""The embedded default corpus: Python's own pydoc topic pages (`pydoc_data.topics.topics`).

Every Python installation ships this dict (~80 documents, ~465 KB of English prose about the
language), so the default model (`model=tiny`) and its evaluation need no download.

Split: documents in sorted key order; a document is in `eval` when the sha256 of its key,
read as an integer, is 0 mod 10 (about 10% of the documents and the characters), else in
`train`. Documents are joined with "\\n\\n".

Note: the text differs between Python versions (the docs are regenerated per release), so
`CORPUS_INFO["sha256"]` and anything keyed on it (the tiny model's cache key) follow the
Python version.
"""
from __future__ import annotations

import hashlib
import sys
from functools import lru_cache

SPLITS = ("train", "eval")
EVAL_MODULUS = 10  # 1 document in EVAL_MODULUS (by key hash) goes to eval
SEPARATOR = "\n\n"


def _is_eval(key: str) -> bool:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % EVAL_MODULUS == 0


@lru_cache(maxsize=1)
def _documents() -> dict[str, list[tuple[str, str]]]:
    from pydoc_data.topics import topics

    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for key in sorted(topics):
        out["eval" if _is_eval(key) else "train"].append((key, topics[key]))
    return out


def default_corpus_keys(split: str) -> list[str]:
    """The topic keys of one split, in the order they are joined."""
    _check(split)
    return [k for k, _ in _documents()[split]]


@lru_cache(maxsize=2)
def default_corpus_text(split: str) -> str:
    """All documents of `split` ("train" or "eval"), sorted by key, joined with "\\n\\n"."""
    _check(split)
    return SEPARATOR.join(text for _, text in _documents()[split])


def _check(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown default-corpus split {split!r}; expected one of {SPLITS}")


def _info() -> dict:
    docs = _documents()
    info = {
        "source": "pydoc_data.topics.topics (Python standard library)",
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "split_rule": f"sha256(key) % {EVAL_MODULUS} == 0 -> eval; sorted keys; joined with '\\n\\n'",
    }
    for s in SPLITS:
        text = default_corpus_text(s)
        info[s] = {
            "n_docs": len(docs[s]),
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
        }
    return info


CORPUS_INFO: dict = _info()
