"""Run records from W&B, for `load_runs(wandb_path=...)` (analysis away from the results dir).

Each W&B run written by `ttvq_bench.record.wandb_log` carries the record itself as the run file
`result.json`; that file is the record. A run without it (written before it was attached, or
its upload missing) is rebuilt from its summary (`/`-joined record fields: metrics, protocol,
identity, timing) and its config (the resolved config, where the file has the defining one),
which is enough for tables and plots but has no per-layer stats.

Unverified against the real service: this machine has no network. The conversion is tested
on a fake API object with the shape of `wandb.Api()` (runs(path, filters) -> runs with
.summary, .config, .file(name).download(root=...)) as documented for wandb 0.31."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

log = logging.getLogger("ttvq")

# Summary keys that are W&B's own or this harness's history/media, not record fields.
NOT_RECORD = ("_", "curves/", "index_change/", "record", "layers", "skipped")


def wandb_records(path: str, api=None, filters: dict | None = None) -> list[dict]:
    """The records of the runs under `path` ("entity/project"), optionally filtered with W&B's
    run filters (e.g. {"group": "stories260k-20260101-120000"})."""
    if api is None:
        import wandb

        api = wandb.Api(timeout=30)
    out, rebuilt = [], 0
    for run in api.runs(path, filters=filters or {}):
        rec = attached_record(run)
        if rec is None:
            rec, rebuilt = record_from_run(run), rebuilt + 1
        if rec.get("run_id"):
            out.append(rec)
    if rebuilt:
        log.warning("W&B %s: %d run(s) had no result.json; rebuilt from their summary (no per-layer stats)", path, rebuilt)
    return out


def attached_record(run) -> dict | None:
    """The run's `result.json`, or None when it has none (or it cannot be fetched)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run.file("result.json").download(root=tmp, replace=True)
            return json.loads((Path(tmp) / "result.json").read_text())
        # Absent, unreadable, or the API failed (wandb's errors share no base class to name):
        # the summary still has every table field, and the caller says how many were rebuilt.
        except Exception as e:
            log.debug("W&B run %s: no usable result.json (%s: %s)", getattr(run, "id", "?"), type(e).__name__, e)
            return None


def record_from_run(run) -> dict:
    """A record from a run's summary (keys split on `/`) and config."""
    summary = getattr(run.summary, "_json_dict", None) or dict(run.summary)
    rec: dict = {}
    for key, value in summary.items():
        if key.startswith(NOT_RECORD) or isinstance(value, dict):
            continue
        *parents, leaf = key.split("/")
        node = rec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    rec["config"] = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
    rec.setdefault("quantize", {})
    return rec
