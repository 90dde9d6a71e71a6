"""Paper-style tables from run records.

    python -m ttvq_analysis --results results --corpus tinystories
prints a markdown table (method x bits: perplexity with achieved bpw), refusing to mix
records whose evaluation protocols differ (different seqlen/BOS/token counts are different
metrics, not different results).
"""
from __future__ import annotations

import pandas as pd

PROTOCOL_KEYS = ("seqlen", "stride", "bos", "n_tokens", "source")


def check_one_protocol(df: pd.DataFrame, corpus: str) -> dict:
    cols = [f"protocol.{corpus}.{k}" for k in PROTOCOL_KEYS if f"protocol.{corpus}.{k}" in df]
    if not cols:
        raise ValueError(f"no records evaluated on {corpus!r}")
    distinct = df[cols].astype(str).drop_duplicates()
    if len(distinct) > 1:
        raise ValueError(f"records on {corpus!r} use {len(distinct)} different protocols; filter first:\n{distinct}")
    return {c.rsplit(".", 1)[1]: df[c].iloc[0] for c in cols}


def ppl_table(df: pd.DataFrame, corpus: str, index: str | list[str] = "method", columns: str = "bits") -> pd.DataFrame:
    """Cells 'ppl (bpw)' for one corpus and one protocol."""
    df = df[df.get(f"ppl.{corpus}").notna()] if f"ppl.{corpus}" in df else df.iloc[0:0]
    check_one_protocol(df, corpus)
    cell = df[f"ppl.{corpus}"].map(lambda v: f"{float(v):.3f}") + df["bpw"].map(lambda b: f" ({b:.2f})")
    return df.assign(cell=cell).pivot_table(index=index, columns=columns, values="cell", aggfunc="last")


def main(argv=None) -> None:
    import argparse

    from ttvq_analysis.load import load_runs

    ap = argparse.ArgumentParser(description="Build a perplexity table from runs.jsonl")
    ap.add_argument("--results", default="results")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--model", default=None, help="only records of this model")
    args = ap.parse_args(argv)
    df = load_runs(args.results)
    if args.model:
        df = df[df["model"] == args.model]
    proto = check_one_protocol(df, args.corpus)
    print(f"perplexity on {args.corpus} (bpw in parentheses); protocol: {proto}\n")
    print(ppl_table(df, args.corpus).to_markdown())
