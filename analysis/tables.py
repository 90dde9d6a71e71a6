"""Paper tables from run records, as DataFrames of numbers (rendering: `render.py`).

- `main_table`: one row per method (with the toggles that differ from its defaults) and bit
  width, the fp16 row first; achieved bpw, bpw_model, perplexity and KL per corpus, zero-shot
  per task and their average, kernel speed-up, quantization time, peak memory; quantized rows
  whose record says over_budget are marked.
- `ablation_table`: one row per combination of named config keys (`--rows`), per bit width
  the perplexity, its ratio to a reference method's, bpw, quantization time and peak memory
  (`ablation_view`: as shown, with the reference looked up).

Both refuse to mix protocols in a column (`protocol.py`) and to put two records in one cell.
Each table carries in `.attrs` how to show it: per column a number format and which way is
better (`better`: min/max, for the bold best value), the rows' grouping and the over-budget mark.
"""
from __future__ import annotations

import pandas as pd

from ttvq_analysis.protocol import check_one_protocol, check_zeroshot_protocol, zeroshot_tasks

REFERENCE_BITS = 16  # fp16 (and any unquantized reference) rows: shown first, never "best"


def _on(df: pd.DataFrame, corpus: str) -> pd.DataFrame:
    return df[df[f"ppl.{corpus}"].notna()] if f"ppl.{corpus}" in df else df.iloc[0:0]


def _one_model(df: pd.DataFrame) -> None:
    models = sorted(df["model"].astype(str).unique()) if "model" in df else []
    if len(models) > 1:
        raise ValueError(f"records of {len(models)} models ({', '.join(models)}): choose one with --model")


def _unique_cells(df: pd.DataFrame, keys: list[str], labels: pd.DataFrame) -> None:
    dup = labels.duplicated(keys, keep=False)
    if dup.any():
        raise ValueError(f"{int(dup.sum())} records share a cell of the table ({', '.join(df.loc[dup, 'run_id'].astype(str))}); "
                         f"filter to one (e.g. --where sweep=...)")


def main_table(df: pd.DataFrame, corpora: str | list[str]) -> pd.DataFrame:
    corpora = [corpora] if isinstance(corpora, str) else list(corpora)
    has = pd.concat([_on(df, c) for c in corpora]) if corpora else df.iloc[0:0]
    df = df.loc[has.index.unique()] if len(has) else has
    if not len(df):
        raise ValueError(f"no records evaluated on {', '.join(corpora)}")
    _one_model(df)
    protocol = {}
    for c in corpora:
        if len(_on(df, c)):
            protocol[c] = check_one_protocol(_on(df, c), c, kl=f"kl.{c}" in df and df[f"kl.{c}"].notna().any())
    tasks = zeroshot_tasks(df)
    if tasks:
        # Records from before tasks named their scored metric were scored by acc.
        metric_cols = [f"zeroshot.tasks.{t}.metric" for t in tasks]
        df = df.assign(**{c: df[c].where(df[c].notna(), "acc") if c in df else "acc" for c in metric_cols})
        protocol["zeroshot"] = check_zeroshot_protocol(df, tasks)

    out = pd.DataFrame({"method": df["method"].astype(str), "setting": df["setting"].fillna(""), "bits": df["bits"].astype(int),
                        "over_budget": df["over_budget"].fillna(False).astype(bool) if "over_budget" in df else False},
                       index=df.index)
    # A bit budget is a quantized row's: the unquantized reference (stored at fp32 by some
    # protocols, 32 bpw against its nominal 16 bits) is never marked.
    out["over_budget"] &= out["bits"] < REFERENCE_BITS
    _unique_cells(df, ["method", "setting", "bits"], out)
    formats, better = {"bits": "d"}, {}

    def add(col: str, values, fmt: str, best: str | None = None) -> None:
        values = pd.to_numeric(pd.Series(values, index=df.index), errors="coerce")
        if values.notna().any():
            out[col], formats[col] = values, fmt
            if best:
                better[col] = best

    add("bpw", df["bpw"], ".3f")
    add("bpw_model", df.get("bpw_model"), ".3f")
    for c in corpora:
        add(f"ppl {c}", df.get(f"ppl.{c}"), ".3f", "min")
        add(f"kl {c}", df.get(f"kl.{c}"), ".3g", "min")
    if tasks:
        for t in tasks:
            metric = protocol["zeroshot"][f"tasks.{t}.metric"]  # one per task, or refused above
            add(f"{t} {metric}", df[f"zeroshot.tasks.{t}.{metric}"], ".3f", "max")
        sets = df[[f"zeroshot.tasks.{t}.acc" for t in tasks]].notna().apply(
            lambda r: ",".join(t for t, ok in zip(tasks, r) if ok), axis=1)
        scored = sets[sets != ""]
        if scored.nunique() > 1:
            raise ValueError("zero-shot averages over different task sets (" + " vs ".join(scored.unique())
                             + "): filter to records with the same tasks")
        add("zs avg", df.get("zeroshot.average"), ".3f", "max")
    add("speedup", df.get("speed.decode.speedup"), ".2f", "max")
    add("quantize_s", df.get("timing.quantize_s"), ".1f")
    add("peak_rss_mb", df.get("peak_rss_mb"), ".0f")

    out = out.assign(_ref=out["bits"] >= REFERENCE_BITS).sort_values(
        ["_ref", "bits", "method", "setting"], ascending=[False, True, True, True]).drop(columns="_ref")
    out = out.reset_index(drop=True)
    if not out["setting"].astype(bool).any():  # every method at its defaults: no column of blanks
        out = out.drop(columns="setting")
    out.attrs = {"formats": formats, "better": better, "group": "bits", "mark": "over_budget",
                 "bits_column": "bits", "protocol": protocol}
    return out


def ablation_table(df: pd.DataFrame, corpus: str, rows: list[str], ref_ppl: float | None = None) -> pd.DataFrame:
    """One row per combination of `rows` (method-config keys such as `method.init`, or any
    record column), columns (bits, field): ppl, x_ref (ppl / ref_ppl), bpw, quantize_s,
    peak_rss_mb, and over_budget where any record is. Combinations with more than one record
    are an error (filter first): an ablation cell must be one run, not whichever came last."""
    df = _on(df, corpus)
    check_one_protocol(df, corpus)
    cols = [r if r in df else f"config.{r}" for r in rows]
    missing = [r for r, c in zip(rows, cols) if c not in df]
    if missing:
        raise ValueError(f"--rows: no such record fields: {', '.join(missing)}")
    dup = df.duplicated(cols + ["bits"], keep=False)
    if dup.any():
        raise ValueError(f"{int(dup.sum())} records share a cell ({', '.join(df.loc[dup, 'run_id'].astype(str))}); "
                         f"filter first (e.g. --where sweep=...)")
    out = pd.DataFrame({"ppl": df[f"ppl.{corpus}"].astype(float), "bpw": df["bpw"].astype(float)})
    if ref_ppl is not None:
        out.insert(1, "x_ref", out["ppl"] / ref_ppl)
    for c in ("timing.quantize_s", "peak_rss_mb"):
        if c in df:
            out[c.split(".")[-1]] = df[c].astype(float)
    if "over_budget" in df and df["over_budget"].fillna(False).astype(bool).any():
        out["over_budget"] = df["over_budget"].fillna(False).astype(float)  # 1.0/0.0: pivots keep it numeric
    out[cols + ["bits"]] = df[cols + ["bits"]].map(_label)
    fields = [c for c in out.columns if c not in cols + ["bits"]]
    table = out.pivot_table(index=cols, columns="bits", aggfunc="first")
    bits = sorted(table.columns.get_level_values(1).unique(), key=lambda b: (len(b), b))
    table = table.reindex(columns=pd.MultiIndex.from_tuples([(f, b) for b in bits for f in fields]))
    table.columns = table.columns.swaplevel(0, 1)
    table.index.names = [c.removeprefix("config.") for c in cols]
    return table


def _label(v) -> str:
    """A row key as the config wrote it: 2 (not the 2.0 a column with gaps holds), true, [a,b]."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_label(x) for x in v) + "]"
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


ABLATION_FIELDS = {"ppl": (".3f", "min"), "x_ref": (".3f", "min"), "bpw": (".3f", None),
                   "quantize_s": (".1f", None), "peak_rss_mb": (".0f", None), "over_budget": ("flag", None)}


def flat(table: pd.DataFrame) -> pd.DataFrame:
    """An ablation table with its row keys as columns and 'w<bits> <field>' column names, plus
    the attrs `render` uses (formats, which way is better per column)."""
    t = table.copy()
    fields = [f for _, f in t.columns]
    t.columns = [f"w{b} {f}" for b, f in t.columns]
    formats = {c: ABLATION_FIELDS[f][0] for c, f in zip(t.columns, fields)}
    better = {c: ABLATION_FIELDS[f][1] for c, f in zip(t.columns, fields) if ABLATION_FIELDS[f][1]}
    t = t.reset_index()
    # A cell over its bit width's budget is never that width's best.
    marks = {c: f"w{b} over_budget" for (b, _), c in zip(table.columns, t.columns[len(t.columns) - len(fields):])
             if c in better and f"w{b} over_budget" in t}
    t.attrs = {"formats": formats, "better": better, "marks": marks}
    return t


def ablation_view(df: pd.DataFrame, corpus: str, rows: list[str], ref: str | None = None,
                  pool: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ablation table as shown (`flat`), with `x_ref` against the perplexity of the one
    `ref` record in `pool` (default df; e.g. every record of the model, since the reference is
    often in another sweep), which must share df's protocol. attrs: protocol, reference."""
    ref_ppl = reference_ppl(df if pool is None else pool, corpus, ref, like=df) if ref else None
    t = flat(ablation_table(df, corpus, rows, ref_ppl))
    t.attrs["protocol"] = {corpus: check_one_protocol(_on(df, corpus), corpus)}
    t.attrs["reference"] = {ref: ref_ppl} if ref else {}
    return t


def reference_ppl(df: pd.DataFrame, corpus: str, method: str, like: pd.DataFrame | None = None) -> float:
    """The perplexity of the one `method` record in df; with `like`, it must share their protocol."""
    ref = _on(df, corpus)
    ref = ref[ref["method"] == method]
    if len(ref) != 1:
        raise ValueError(f"need exactly one {method!r} record on {corpus!r} for the reference, found {len(ref)}")
    if like is not None:
        check_one_protocol(pd.concat([_on(like, corpus), ref]), corpus)
    return float(ref[f"ppl.{corpus}"].iloc[0])


def best_mask(table: pd.DataFrame) -> pd.DataFrame:
    """True where a cell holds its column's best value (attrs `better`) among comparable rows:
    within its group (attrs `group`, e.g. one bit width), never a reference row (16 in the
    attrs `bits_column`), never an over-budget row (attrs `mark`; per column: attrs `marks`,
    column -> its own mark column, as an ablation table's bit widths have). Ties are all best."""
    a = table.attrs
    mask = pd.DataFrame(False, index=table.index, columns=table.columns)
    eligible = pd.Series(True, index=table.index)
    if a.get("bits_column"):
        eligible &= table[a["bits_column"]] < REFERENCE_BITS
    if a.get("mark"):
        eligible &= ~table[a["mark"]].astype(bool)
    groups = table.groupby(a["group"]).groups.values() if a.get("group") else [table.index]
    for col, how in a.get("better", {}).items():
        for idx in groups:
            ok = eligible & ~table[a["marks"][col]].fillna(0).astype(bool) if col in a.get("marks", {}) else eligible
            vals = table.loc[[i for i in idx if ok[i]], col].dropna()
            if len(vals) > 1:
                best = vals.min() if how == "min" else vals.max()
                mask.loc[vals.index[vals == best], col] = True
    return mask
