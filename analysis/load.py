"""Load run records (the local `runs.jsonl`, source of truth) into a flat pandas DataFrame."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ttvq_bench.record.results import read_runs


# Columns an evaluation adds to a record; the rest describes the quantization and the run.
EVAL_PREFIXES = ("ppl.", "protocol.", "zeroshot.", "kl.", "top1.", "speed.")
TIMING_SUFFIXES = ("wall_s", "_s", ".cached", ".seconds")  # how long it took, not what it measured
TIMING_PREFIXES = ("speed.",)  # kernel timings: every measurement differs a little (the newest counts)


def load_runs(results_dir: str | Path = "results", status: str | None = "ok", latest: bool = True,
              merge: bool = True) -> pd.DataFrame:
    """One row per record, nested fields flattened with dots (`ppl.tinystories`,
    `protocol.tinystories.seqlen`, `config.method.group_size`, ...).

    Two documented rules, and no silent choice beyond them:
    - latest: of several records of one run_id only the newest counts (a forced rerun
      supersedes the old one);
    - merge: records of one quantization (the same stored weights: `quantization` is the
      checkpoint's content hash, or its cache key) are one row, their evaluations side by
      side (perplexity from one job, zero-shot from another). Two values of one metric for one
      quantization are a conflict: ValueError naming the run_ids.
    """
    recs = read_runs(results_dir)
    if status is not None:
        recs = [r for r in recs if r.get("status") == status]
    rows = []
    for r in recs:
        q = r.get("quantize") or {}
        # Per-layer quantization stats are bulky and not table material.
        rows.append({k: v for k, v in r.items() if k != "quantize"} | {
            "quantize.source": q.get("source"),
            "quantization": q.get("content_sha") or r.get("checkpoint_key") or r.get("run_id")})
    df = pd.json_normalize(rows) if rows else pd.DataFrame()
    if latest and len(df):
        df = df.sort_values("time").drop_duplicates("run_id", keep="last")
    if merge and len(df):
        df = merge_quantizations(df)
    return df.reset_index(drop=True)


def merge_quantizations(df: pd.DataFrame) -> pd.DataFrame:
    """One row per `quantization`: evaluation columns combined, every other column from the
    newest record; conflicting values of one evaluation column are an error."""
    evals = [c for c in df.columns if c.startswith(EVAL_PREFIXES)]
    out = []
    for _, g in df.sort_values("time").groupby("quantization", sort=False):
        row = g.iloc[-1].copy()
        for c in evals:
            vals = g[c].dropna()
            distinct = vals.astype(str).unique()
            if len(distinct) > 1 and not (c.endswith(TIMING_SUFFIXES) or c.startswith(TIMING_PREFIXES)):
                raise ValueError(f"records {', '.join(g['run_id'].astype(str))} evaluate one quantization and disagree "
                                 f"on {c} ({', '.join(distinct)}); filter to one of them")
            row[c] = vals.iloc[-1] if len(vals) else row[c]
        row["run_id"] = ",".join(g["run_id"].astype(str))
        out.append(row)
    return pd.DataFrame(out)
