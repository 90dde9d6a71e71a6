"""The short table printed at the end of a sweep (`python -m ttvq_bench -m ...`, by the Hydra
callback in `callback.py`): one row per point of the sweep, failed and skipped ones included,
with what it measured."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ttvq_bench.record.results import read_runs

from ttvq_analysis.tables import REFERENCE_BITS

FORMATS = {"bits": "d", "bpw": ".3f", "ppl": ".3f", "kl": ".3g"}


def sweep_table(df: pd.DataFrame, sweep: str) -> pd.DataFrame:
    """From `load_runs(..., status=None, merge=False)`: method, setting, bits, status, bpw and
    perplexity and KL per corpus of the records of `sweep`."""
    if "sweep" not in df or not (df["sweep"].astype(str) == sweep).any():
        raise ValueError(f"no records of sweep {sweep!r}")
    df = df[df["sweep"].astype(str) == sweep]
    overrides = df["overrides"] if "overrides" in df else pd.Series([None] * len(df), index=df.index)

    def given(key: str, ov) -> str | None:  # a point killed before its record: its command line says
        return next((o.split("=", 1)[1] for o in (ov if isinstance(ov, list) else []) if o.startswith(f"{key}=")), None)

    method = df["method"] if "method" in df else pd.Series([None] * len(df), index=df.index)
    bits = df["bits"] if "bits" in df else pd.Series([None] * len(df), index=df.index)
    out = pd.DataFrame({
        "method": [m if isinstance(m, str) else given("method", o) or "?" for m, o in zip(method, overrides)],
        "setting": df["setting"].fillna("") if "setting" in df else "",
        "bits": pd.array([int(b) if pd.notna(b) else int(given("bits", o)) if given("bits", o) else None
                          for b, o in zip(bits, overrides)], dtype="Int64"),
        "status": df["status"].astype(str),
        "bpw": pd.to_numeric(df["bpw"], errors="coerce") if "bpw" in df else float("nan"),
    }, index=df.index)
    formats = dict(FORMATS)
    for c in sorted(k[4:] for k in df.columns if k.startswith("ppl.")):
        for what in ("ppl", "kl"):
            if f"{what}.{c}" in df and df[f"{what}.{c}"].notna().any():
                out[f"{what} {c}"] = pd.to_numeric(df[f"{what}.{c}"], errors="coerce")
                formats[f"{what} {c}"] = FORMATS[what]
    if not out["setting"].astype(bool).any():
        out = out.drop(columns="setting")
    out = out.assign(_ref=(out["bits"] >= REFERENCE_BITS).fillna(False)).sort_values(
        ["_ref", "bits", "method"], ascending=[False, True, True]).drop(columns="_ref").reset_index(drop=True)
    out.attrs = {"formats": {k: v for k, v in formats.items() if k in out}}
    return out


def sweep_records(results_dir: str, sweep: str, sweep_dir: str | Path | None = None) -> list[dict]:
    """The records of `sweep` in `results_dir`, and with `sweep_dir` (the Hydra sweep dir) the
    points skipped because their run_id already had an ok record: their `result.json` is that
    record, from an earlier sweep; here it has status `skipped` and this sweep's name."""
    recs = [r for r in read_runs(results_dir) if r.get("sweep") == sweep]
    ids = {r.get("run_id") for r in recs}
    for f in sorted(Path(sweep_dir).glob("*/result.json")) if sweep_dir else []:
        r = json.loads(f.read_text())
        if r.get("run_id") not in ids and r.get("sweep") != sweep:
            recs.append(r | {"sweep": sweep, "status": "skipped"})
            ids.add(r.get("run_id"))
    return recs


def sweep_summary(results_dir: str, sweep: str, sweep_dir: str | Path | None = None) -> str:
    """A markdown table of the sweep's records (`sweep_records`), for the end of
    `python -m ttvq_bench -m ...`. Never raises: anything that stops it (no records, an
    unreadable dir) is one line instead."""
    try:
        from ttvq_analysis.load import records_frame
        from ttvq_analysis.render import render

        recs = sweep_records(results_dir, sweep, sweep_dir)
        return render(sweep_table(records_frame(recs, status=None, merge=False), sweep), "md")
    except Exception as e:  # a summary must never cost the sweep its exit status or its last line
        return f"(no summary of sweep {sweep!r} in {results_dir}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
