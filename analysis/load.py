"""Load run records into one flat pandas DataFrame: the local `runs.jsonl` of one or more
results dirs (the source of truth) and, as an option, runs mirrored to W&B."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ttvq_bench.record.results import read_runs
from ttvq_bench.record.wandb_log import toggle_string


# Columns an evaluation adds to a record; the rest describes the quantization and the run.
EVAL_PREFIXES = ("ppl.", "protocol.", "zeroshot.", "kl.", "top1.", "speed.")
# How long it took, whether it was cached, where its files are: not what it measured, so two
# evaluations of one quantization may differ there without conflicting (the newest counts).
INCIDENTAL_SUFFIXES = ("wall_s", "_s", ".cached", ".seconds", ".samples")
INCIDENTAL_PREFIXES = ("speed.",)  # kernel timings: every measurement differs a little
# Measurements: columns whose values are numbers, even where a record wrote NaN/Inf as a string
# (JSON has neither, see record/results.py).
NUMERIC_PREFIXES = EVAL_PREFIXES + ("timing.",)
NUMERIC_COLUMNS = ("bits", "bpw", "bpw_model", "peak_rss_mb")


def default_results_dir() -> str:
    """Where jobs write records by default (`results_dir` in ttvq_bench/config.py)."""
    return os.environ.get("TTVQ_RESULTS") or str(Path.home() / "ttvq" / "results")


def load_runs(results_dir: str | Path | list[str | Path] | None = None, status: str | None = "ok", latest: bool = True,
              merge: bool = True, *, wandb_path: str | None = None, wandb_api=None,
              wandb_filters: dict | None = None) -> pd.DataFrame:
    """One row per record, nested fields flattened with dots (`ppl.tinystories`,
    `protocol.tinystories.seqlen`, `config.method.group_size`, ...), measurements as numbers,
    `setting` (the method's toggles that differ from its defaults: `group_size=128,act_order=true`)
    and `results_dir` saying where each came from.

    results_dir: one dir or a list of them (their records are pooled); default the jobs' own
    default ($TTVQ_RESULTS, else ~/ttvq/results). wandb_path
    ("entity/project"): also the runs mirrored there (`wandb_source.wandb_records`; needs the
    network and an API key; `wandb_api` injects the API object, tests pass a fake one).

    Two documented rules, and no silent choice beyond them:
    - latest: of several records of one run_id only the newest counts (a forced rerun
      supersedes the old one);
    - merge: records of one quantization (`quantization`: the same stored weights, by the
      checkpoint's content hash or its cache key, from the same method, bits and setting) are
      one row, their evaluations side by side (perplexity from one job, zero-shot from another).
      Two values of one metric for one quantization are a conflict: ValueError naming the
      run_ids (timings, kernel speed, cache flags and sample paths excepted: the newest counts).
    """
    results_dir = default_results_dir() if results_dir is None else results_dir
    dirs = results_dir if isinstance(results_dir, (list, tuple)) else [results_dir]
    recs = [r | {"results_dir": str(d)} for d in dirs for r in read_runs(d)]
    if wandb_path:
        from ttvq_analysis.wandb_source import wandb_records

        recs += [r | {"results_dir": f"wandb:{wandb_path}"}
                 for r in wandb_records(wandb_path, api=wandb_api, filters=wandb_filters)]
    return records_frame(recs, status=status, latest=latest, merge=merge)


def records_frame(recs: list[dict], status: str | None = "ok", latest: bool = True, merge: bool = True) -> pd.DataFrame:
    """The DataFrame of `load_runs` from records already read."""
    if status is not None:
        recs = [r for r in recs if r.get("status") == status]
    rows = []
    for r in recs:
        q = r.get("quantize") or {}
        # From the nested record, before flattening turns a column's ints into floats.
        setting = toggle_string((r.get("config") or {}).get("method") or {"name": r.get("method")}) if r.get("method") else None
        weights = q.get("content_sha") or r.get("checkpoint_key") or r.get("run_id")
        # Per-layer quantization stats are bulky and not table material (W&B has them per run).
        rows.append({k: v for k, v in r.items() if k != "quantize"} | {
            "quantize.source": q.get("source"), "setting": setting,
            # The weights and what made them: two configs that happen to store identical weights
            # (a toggle without effect on this model) are two ablation cells, not one.
            "quantization": f"{weights}|{r.get('method')}|{r.get('bits')}|{setting}"})
    df = pd.json_normalize(rows) if rows else pd.DataFrame()
    df = numeric(df)
    if latest and len(df) and "run_id" in df:
        df = df.sort_values("time")
        known = df["run_id"].notna()  # a point killed before it had a run_id: its own record
        df = pd.concat([df[known].drop_duplicates("run_id", keep="last"), df[~known]]).sort_values("time")
    if merge and len(df):
        df = merge_quantizations(df)
    return df.reset_index(drop=True)


def numeric(df: pd.DataFrame) -> pd.DataFrame:
    """Measurement columns as numbers: 'nan'/'inf' strings (how records write them) become
    floats. A column with any other string (a metric's name, a path, a version) stays as it is."""
    for c in df.columns:
        if not (c in NUMERIC_COLUMNS or c.startswith(NUMERIC_PREFIXES)) or df[c].dtype != object:
            continue
        vals = df[c].dropna()
        if len(vals) and not vals.map(lambda v: isinstance(v, bool)).any():
            try:
                df[c] = pd.to_numeric(df[c], errors="raise")
            except (ValueError, TypeError):
                pass
    return df


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
            if len(distinct) > 1 and not c.endswith(INCIDENTAL_SUFFIXES) and not c.startswith(INCIDENTAL_PREFIXES):
                raise ValueError(f"records {', '.join(g['run_id'].astype(str))} evaluate one quantization and disagree "
                                 f"on {c} ({', '.join(distinct)}); filter to one of them")
            row[c] = vals.iloc[-1] if len(vals) else row[c]
        row["run_id"] = ",".join(g["run_id"].astype(str))
        out.append(row)
    return pd.DataFrame(out)
