"""Local results store: `result.json` in the job's output dir and one JSON line per job in
`<results_dir>/runs.jsonl` (the source of truth; W&B mirrors it).

A line cut short (a job killed mid-append, a full disk) never costs another record: an append
first ends a torn last line, and readers skip unreadable lines and say how many.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from pathlib import Path

from ttvq_bench.faults import fault_point
from ttvq_bench.record.cache import tmp_prefix

log = logging.getLogger("ttvq")


def _clean(o):
    """JSON has no NaN/Inf: write them as strings so every line parses everywhere."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{tmp_prefix(path.name)}x")
    tmp.write_text(json.dumps(_clean(obj), indent=2, sort_keys=False))
    os.replace(tmp, path)


def append_run(results_dir: str | Path, record: dict) -> Path:
    """Append one line under an exclusive lock: safe with parallel jobs on one filesystem."""
    path = Path(results_dir) / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_clean(record), separators=(",", ":")) + "\n"
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn last line: end it, so this record stands on its own
                    line = "\n" + line
            data = line.encode()
            f.write(data[: len(data) // 2])
            f.flush()
            fault_point("append")  # a job killed mid-append leaves half a line
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return path


def read_runs(results_dir: str | Path) -> list[dict]:
    path = Path(results_dir) / "runs.jsonl"
    if not path.exists():
        return []
    out, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash elsewhere never hides the others
            bad += 1
    if bad:
        log.warning("%s: skipped %d unreadable line(s) (cut short by a killed job or a full disk)", path, bad)
    return out


def find_ok(results_dir: str | Path, run_id: str) -> dict | None:
    for rec in reversed(read_runs(results_dir)):
        if rec.get("run_id") == run_id and rec.get("status") == "ok":
            return rec
    return None
