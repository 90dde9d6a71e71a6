"""Load run records (the local `runs.jsonl`, source of truth) into a flat pandas DataFrame."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ttvq_bench.record.results import read_runs


def load_runs(results_dir: str | Path = "results", status: str | None = "ok", latest: bool = True) -> pd.DataFrame:
    """One row per record, nested fields flattened with dots (`ppl.tinystories`,
    `protocol.tinystories.seqlen`, `config.method.group_size`, ...).

    latest: keep only the newest record of each run_id (a forced rerun supersedes the old one).
    """
    recs = read_runs(results_dir)
    if status is not None:
        recs = [r for r in recs if r.get("status") == status]
    # Per-layer quantization stats are bulky and not table material.
    recs = [{k: v for k, v in r.items() if k != "quantize"} | {"quantize.source": (r.get("quantize") or {}).get("source")}
            for r in recs]
    df = pd.json_normalize(recs) if recs else pd.DataFrame()
    if latest and len(df):
        df = df.sort_values("time").drop_duplicates("run_id", keep="last")
    return df.reset_index(drop=True)
