"""One column, one protocol: records measured under different protocols (two seqlens, two
splits, two lm-eval versions, two zero-shot subsamples) are different metrics, not different
results, so a table or plot that would put them side by side refuses, naming the difference."""
from __future__ import annotations

import pandas as pd

PPL_KEYS = ("seqlen", "stride", "bos", "n_tokens", "split", "source")
KL_KEYS = ("kl.exact", "kl.topk")  # exact KL, or a lower bound from the top-k tokens
ZEROSHOT_KEYS = ("lm_eval_version", "bos", "limit", "seed", "num_fewshot")
ZEROSHOT_TASK_KEYS = ("n", "task_version", "metric")


def _one(df: pd.DataFrame, cols: list[str], what: str) -> dict:
    """{col: value} when every row agrees on `cols`; ValueError naming the first difference."""
    out = {}
    for c in cols if len(df) else []:
        vals = df[c].map(lambda v: "(missing)" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
        distinct = list(dict.fromkeys(vals))
        if len(distinct) > 1:
            runs = {v: ",".join(df.loc[vals == v, "run_id"].astype(str))[:60] for v in distinct}
            raise ValueError(f"{what} mix protocols: {c} is " + " vs ".join(f"{v} (runs {runs[v]})" for v in distinct)
                             + f"; filter first (e.g. --where {c}={distinct[0]})")
        v = df[c].iloc[0]
        out[c] = v.item() if hasattr(v, "item") else v
    return out


def check_one_protocol(df: pd.DataFrame, corpus: str, kl: bool = False) -> dict:
    """The perplexity protocol (and with `kl` the KL one) shared by every row of df on `corpus`."""
    prefix = f"protocol.{corpus}."
    cols = [prefix + k for k in PPL_KEYS + (KL_KEYS if kl else ()) if prefix + k in df]
    if not cols or not len(df):
        raise ValueError(f"no records evaluated on {corpus!r}")
    return {c.removeprefix(prefix): v for c, v in _one(df, cols, f"records on {corpus!r}").items()}


def check_zeroshot_protocol(df: pd.DataFrame, tasks: list[str]) -> dict:
    """The zero-shot protocol shared by every row of df that has zero-shot results, per task
    (its n, version and scored metric) and overall (lm-eval version, BOS, subsample)."""
    scored = df[df[[f"zeroshot.tasks.{t}.acc" for t in tasks]].notna().any(axis=1)] if tasks else df.iloc[0:0]
    out = _one(scored, [f"zeroshot.{k}" for k in ZEROSHOT_KEYS if f"zeroshot.{k}" in df], "zero-shot records")
    for t in tasks:
        has = df[df[f"zeroshot.tasks.{t}.acc"].notna()]
        cols = [f"zeroshot.tasks.{t}.{k}" for k in ZEROSHOT_TASK_KEYS if f"zeroshot.tasks.{t}.{k}" in df]
        out.update(_one(has, cols, f"zero-shot records of {t!r}"))
    return {k.removeprefix("zeroshot."): v for k, v in out.items()}


def zeroshot_tasks(df: pd.DataFrame) -> list[str]:
    """The zero-shot tasks that rows of df report, in their columns' order."""
    return [c[len("zeroshot.tasks."):-len(".acc")] for c in df.columns
            if c.startswith("zeroshot.tasks.") and c.endswith(".acc") and df[c].notna().any()]
