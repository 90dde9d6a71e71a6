"""W&B mirror of a run record. Offline by default: no account, no network, never blocks."""
from __future__ import annotations

import os
from pathlib import Path


class WandbRun:
    def __init__(self, wcfg, config: dict, output_dir: Path, group: str | None, tags: list[str], name: str):
        self.run = None
        if wcfg.mode == "disabled":
            return
        self.run = _wandb_init(
            mode=wcfg.mode, project=wcfg.project, entity=wcfg.entity, group=wcfg.group or group,
            tags=list(wcfg.tags) + tags, name=name, config=config, dir=str(output_dir), reinit="finish_previous",
        )

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log(_flatten(metrics))

    def finish(self, record: dict, ok: bool) -> None:
        if self.run is None:
            return
        for k, v in _flatten({k: record.get(k) for k in ("status", "bpw", "bpw_model", "ppl", "zeroshot", "speed", "timing", "peak_rss_mb", "run_id")}).items():
            if v is not None:
                self.run.summary[k] = v
        # A failed job must not show as finished-ok (wandb#4591).
        self.run.finish(exit_code=0 if ok else 1)


def _wandb_init(**kwargs):
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(**kwargs)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out
