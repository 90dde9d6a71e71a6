"""Paper-style tables from run records.

    python -m ttvq_analysis --results results --corpus tinystories
prints a markdown table (method x bits: perplexity with achieved bpw), refusing to mix
records whose evaluation protocols differ (different seqlen/BOS/token counts are different
metrics, not different results).

    python -m ttvq_analysis --results results --corpus tinystories --method ttvq \
        --rows method.init,method.index_update,method.codebook --ref fp16
prints an ablation table: one row per combination of the named method-config keys, and per
bit width the perplexity, its ratio to the reference method's perplexity, the bpw, the
quantization time and the peak memory.
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
    return {c.rsplit(".", 1)[1]: df[c].iloc[0].item() if hasattr(df[c].iloc[0], "item") else df[c].iloc[0]
            for c in cols}


def _on(df: pd.DataFrame, corpus: str) -> pd.DataFrame:
    return df[df[f"ppl.{corpus}"].notna()] if f"ppl.{corpus}" in df else df.iloc[0:0]


def ppl_table(df: pd.DataFrame, corpus: str, index: str | list[str] = "method", columns: str = "bits") -> pd.DataFrame:
    """Cells 'ppl (bpw)' for one corpus and one protocol."""
    df = _on(df, corpus)
    check_one_protocol(df, corpus)
    keys = ([index] if isinstance(index, str) else list(index)) + [columns]
    dup = df.duplicated(keys, keep=False)
    if dup.any():
        raise ValueError(f"{int(dup.sum())} records share a cell of the table, runs "
                         f"{', '.join(df.loc[dup, 'run_id'].astype(str))}; filter to one (e.g. --where sweep=...)")
    over = df["over_budget"].fillna(False).astype(bool) if "over_budget" in df else pd.Series(False, index=df.index)
    cell = (df[f"ppl.{corpus}"].map(lambda v: f"{float(v):.3f}") + df["bpw"].map(lambda b: f" ({b:.2f})")
            + over.map(lambda o: " *over budget*" if o else ""))
    return df.assign(cell=cell).pivot_table(index=index, columns=columns, values="cell", aggfunc="first")


def ablation_table(df: pd.DataFrame, corpus: str, rows: list[str], ref_ppl: float | None = None) -> pd.DataFrame:
    """One row per combination of `rows` (method-config keys such as `method.init`, or any
    record column), columns (bits, field): ppl, ×ref (ppl / ref_ppl), bpw, quantize_s,
    peak_rss_mb. Combinations with more than one record are an error (filter first): an
    ablation cell must be one run, not whichever came last."""
    df = _on(df, corpus)
    check_one_protocol(df, corpus)
    cols = [r if r in df else f"config.{r}" for r in rows]
    missing = [c for c in cols if c not in df]
    if missing:
        raise ValueError(f"no such record fields: {missing}")
    dup = df.duplicated(cols + ["bits"], keep=False)
    if dup.any():
        raise ValueError(f"{int(dup.sum())} records share a cell; filter first:\n{df.loc[dup, cols + ['bits', 'run_id']]}")
    out = pd.DataFrame({"ppl": df[f"ppl.{corpus}"].astype(float), "bpw": df["bpw"].astype(float)})
    if ref_ppl is not None:
        out.insert(1, "x_ref", out["ppl"] / ref_ppl)
    for c in ("timing.quantize_s", "peak_rss_mb"):
        if c in df:
            out[c.split(".")[-1]] = df[c].astype(float)
    out[cols + ["bits"]] = df[cols + ["bits"]].astype(str).where(df[cols + ["bits"]].notna(), "-")
    fields = [c for c in out.columns if c not in cols + ["bits"]]
    table = out.pivot_table(index=cols, columns="bits", aggfunc="first")
    bits = sorted(table.columns.get_level_values(1).unique(), key=lambda b: (len(b), b))
    table = table.reindex(columns=pd.MultiIndex.from_tuples([(f, b) for b in bits for f in fields]))
    table.columns = table.columns.swaplevel(0, 1)
    table.index.names = [c.removeprefix("config.") for c in cols]
    return table


def flat(table: pd.DataFrame) -> pd.DataFrame:
    """Row keys as columns and 'bits field' column names: what a markdown table shows well."""
    t = table.copy()
    t.columns = [f"w{b} {f}" for b, f in t.columns]
    return t.reset_index()


def reference_ppl(df: pd.DataFrame, corpus: str, method: str, like: pd.DataFrame | None = None) -> float:
    """The perplexity of the one `method` record in df; with `like`, it must share their protocol."""
    ref = _on(df, corpus)
    ref = ref[ref["method"] == method]
    if len(ref) != 1:
        raise ValueError(f"need exactly one {method!r} record on {corpus!r} for the reference, found {len(ref)}")
    if like is not None:
        check_one_protocol(pd.concat([_on(like, corpus), ref]), corpus)
    return float(ref[f"ppl.{corpus}"].iloc[0])


def main(argv=None) -> None:
    import argparse

    from ttvq_analysis.load import load_runs

    ap = argparse.ArgumentParser(description="Build a perplexity table from runs.jsonl")
    ap.add_argument("--results", default="results")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--model", default=None, help="only records of this model")
    ap.add_argument("--method", default=None, help="only records of this method (ablation tables)")
    ap.add_argument("--rows", default=None, help="comma-separated config keys: an ablation table")
    ap.add_argument("--ref", default=None, help="method whose perplexity is the ratio's denominator (e.g. fp16); "
                    "looked up before --where/--method, among records of the same protocol")
    ap.add_argument("--where", action="append", default=[], help="KEY=VALUE filter on a record field (repeatable)")
    args = ap.parse_args(argv)
    df = load_runs(args.results)
    if args.model:
        df = df[df["model"] == args.model]
    everything = df  # the reference may come from another sweep (it is checked for the same protocol)
    for cond in args.where:
        key, _, val = cond.partition("=")
        col = key if key in df else f"config.{key}"
        if col not in df:
            raise SystemExit(f"error: --where: no such field {key!r}")
        df = df[df[col].astype(str) == val]
    if args.method:
        df = df[df["method"] == args.method]
    ref = reference_ppl(everything, args.corpus, args.ref, like=df) if args.ref else None
    proto = check_one_protocol(_on(df, args.corpus), args.corpus)
    print(f"perplexity on {args.corpus}; protocol: {proto}" + (f"; reference {args.ref} = {ref:.4f}" if ref else "") + "\n")
    if args.rows:
        t = flat(ablation_table(df, args.corpus, args.rows.split(","), ref))
        print(t.astype(object).where(t.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval="-"))
    else:
        print(ppl_table(df, args.corpus).to_markdown())
