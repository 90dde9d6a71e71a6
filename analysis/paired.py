"""Paired comparison of two zero-shot evaluations, document by document.

Two methods scored on the same documents differ less by chance than their two accuracies'
stderrs suggest: the per-document difference has its own, smaller stderr. The documents'
outputs are the `samples.jsonl` a zero-shot evaluation writes (its path is the record's
`zeroshot.tasks.<task>.samples`, a column of `load_runs`).

    a = df.loc[df.method == "gptq", "zeroshot.tasks.piqa.samples"].item()
    b = df.loc[df.method == "rtn", "zeroshot.tasks.piqa.samples"].item()
    paired_zeroshot(a, b, "acc")
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd


def read_samples(path: str | Path) -> pd.DataFrame:
    """One row per document, indexed by lm-eval's doc_id."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no zero-shot samples at {p} (evaluated before they were kept, or the cache was removed)")
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return pd.DataFrame(rows).set_index("doc_id")


def paired_zeroshot(samples_a: str | Path, samples_b: str | Path, metric: str = "acc") -> dict:
    """Mean of metric(a) - metric(b) over the documents both scored, its paired stderr, and how
    many documents only one of them got right."""
    a, b = read_samples(samples_a), read_samples(samples_b)
    common = a.index.intersection(b.index)
    if not len(common):
        raise ValueError("the two evaluations share no document: different tasks or subsamples")
    if "doc_hash" in a and "doc_hash" in b and (a.loc[common, "doc_hash"] != b.loc[common, "doc_hash"]).any():
        raise ValueError("the two evaluations give one doc_id to different documents: different task data")
    if metric not in a or metric not in b:
        raise ValueError(f"no per-document {metric!r} in both sample files")
    d = a.loc[common, metric].astype(float) - b.loc[common, metric].astype(float)
    n = len(d)
    return {"n": n, "a": float(a.loc[common, metric].mean()), "b": float(b.loc[common, metric].mean()),
            "diff": float(d.mean()), "stderr": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
            "a_only": int((d > 0).sum()), "b_only": int((d < 0).sum())}
