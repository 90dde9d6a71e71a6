"""Text corpora, each with an evaluation split and a calibration split.

`load_text(corpus, split)` returns one string for split "eval" or "calib". How each corpus
is joined follows the GPTQ codebase (rows joined with "\\n\\n"), and `describe` says exactly
what was read so the record can state it. Nothing is ever downloaded: files are read by path
and the Hugging Face datasets cache is used only when present (offline).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Callable

from ttvq_bench.data.default_corpus import default_corpus_text
from ttvq_bench.errors import DataError
from ttvq_bench.registry import Registry

SPLITS = ("eval", "calib", "all", "train")  # "all": the file as it is; "train": WikiText-2's train split (GPTQ's calibration)
# kind -> fn(corpus config, split) -> (text, source description)
CORPORA: Registry[Callable] = Registry("corpus kind", error=DataError)


def load_text(corpus, split: str) -> tuple[str, str]:
    """(text, source description) of `split` of a CorpusConfig-like object."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    loader = CORPORA.get(corpus.kind)
    if split == "all" and corpus.kind not in ("tinystories", "file"):
        raise DataError(f"corpus kind {corpus.kind!r} has no whole-file text (calib.split=all needs tinystories or file)")
    if split == "train" and corpus.kind not in ("wikitext2", "wikitext2_raw"):
        raise DataError(f"corpus kind {corpus.kind!r} has no train split here (calib.split=train needs wikitext2 or wikitext2_raw)")
    text, source = loader(corpus, split)
    if not text.strip():
        raise DataError(f"corpus {corpus.name!r} ({source}) has an empty {split} split")
    return text, source


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None


def _need_file(path, what: str) -> Path:
    if path is None:
        raise DataError(f"{what}: no path given")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise DataError(f"{what}: file not found: {p} (the public datasets are read under paths.data_root: "
                        "set paths.data_root=DIR or the TTVQ_DATA variable)")
    return p


def _split_documents(text: str, split: str, calib_fraction: float) -> str:
    """Documents separated by blank lines; the last `calib_fraction` of them is calibration."""
    docs = [d.strip("\n") for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
    if len(docs) < 2:
        raise DataError("corpus needs at least two documents (separated by blank lines) to split eval/calib")
    n_calib = max(1, round(len(docs) * calib_fraction))
    part = docs[:-n_calib] if split == "eval" else docs[-n_calib:]
    return "\n\n".join(part)


@CORPORA.register("default")
def _default(corpus, split):
    # The default corpus's own train split is what the tiny model saw; calibrating on it is
    # calibrating on training-distribution text, never on the held-out evaluation text.
    return default_corpus_text("eval" if split == "eval" else "train"), f"pydoc_data.topics:{'eval' if split == 'eval' else 'train'}"


@CORPORA.register("tinystories")
@CORPORA.register("file")
def _documents_file(corpus, split):
    p = _need_file(corpus.path, f"corpus {corpus.name!r}")
    text = _read(p)
    if split == "all":
        return text, f"{p.name}:whole file"
    frac = corpus.calib_fraction
    return _split_documents(text, split, frac), f"{p.name}:{split}(calib=last {frac:.0%} of documents)"


def _hf_cached_dataset(*args, **kwargs):
    """A dataset from the Hugging Face datasets cache, offline; None when it is not there."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets

        return datasets.load_dataset(*args, **kwargs)
    except Exception:
        return None


_WIKI_SPLITS = {"eval": "test", "calib": "valid", "train": "train"}  # our split -> WikiText-2's
_HF_SPLITS = {"test": "test", "valid": "validation", "train": "train"}


@CORPORA.register("wikitext2")
def _wikitext2(corpus, split):
    fname = f"wiki.{_WIKI_SPLITS[split]}.tokens"
    if corpus.path and (Path(str(corpus.path)) / fname).is_file():
        p = Path(str(corpus.path)) / fname
        # HF rows are the file's lines (newline kept); GPTQ joins the rows with "\n\n".
        rows = _read(p).splitlines(keepends=True)
        return "\n\n".join(rows), f"{fname}(rows joined with \\n\\n)"
    hf_split = _HF_SPLITS[_WIKI_SPLITS[split]]
    ds = _hf_cached_dataset("wikitext", "wikitext-2-v1", split=hf_split)
    if ds is None:
        raise DataError(f"wikitext2: {fname} not found under {corpus.path} and not in the HF datasets cache")
    return "\n\n".join(ds["text"]), f"hf:wikitext-2-v1:{hf_split}"


@CORPORA.register("wikitext2_raw")
def _wikitext2_raw(corpus, split):
    hf_split = _HF_SPLITS[_WIKI_SPLITS[split]]
    ds = _hf_cached_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    if ds is not None:
        return "\n\n".join(ds["text"]), f"hf:wikitext-2-raw-v1:{hf_split}"
    fname = f"wiki.{_WIKI_SPLITS[split]}.raw"
    p = Path(str(corpus.path or "")) / fname
    if not p.is_file():
        raise DataError(f"wikitext2_raw: not in the HF datasets cache and {p} not found")
    rows = _read(p).replace("\r\n", "\n").splitlines(keepends=True)
    return "\n\n".join(rows), f"{fname}(CRLF->LF, rows joined with \\n\\n; not byte-identical to HF rows)"


def _read_c4(path: Path, n_docs: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line)["text"])
            if len(docs) >= n_docs:
                break
    return docs


@CORPORA.register("c4")
def _c4(corpus, split):
    # GPTQ "c4-new": validation docs[:1100] joined with " "; calibration from a train shard.
    n_docs = 1100 if split == "eval" else 20000
    path = corpus.path if split == "eval" else corpus.calib_path
    if path:
        p = _need_file(path, f"c4 {split}")
        return " ".join(_read_c4(p, n_docs)), f"{p.name}[:{n_docs}] joined with ' '"
    shard = "en/c4-validation.00000-of-00008.json.gz" if split == "eval" else "en/c4-train.00000-of-01024.json.gz"
    ds = _hf_cached_dataset("allenai/c4", data_files={"x": shard}, split="x")
    if ds is None:
        raise DataError(f"c4: no data.{'path' if split == 'eval' else 'calib_path'} given and {shard} not in the HF datasets cache")
    return " ".join(ds[:n_docs]["text"]), f"hf:allenai/c4:{shard}[:{n_docs}]"
