"""W&B mirror of a run record. Offline by default: no account, no network, never blocks.

`online` without an API key, or when the service cannot be reached within a few seconds,
falls back to offline with one warning line (`wandb sync` uploads it later): W&B never costs
a job."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("ttvq")


class WandbRun:
    def __init__(self, wcfg, config: dict, output_dir: Path, group: str | None, tags: list[str], name: str):
        self.run = None
        if wcfg.mode == "disabled":
            return
        kwargs = dict(project=wcfg.project, entity=wcfg.entity, group=wcfg.group or group,
                      tags=list(wcfg.tags) + tags, name=name, config=config, dir=str(output_dir), reinit="finish_previous")
        mode = str(wcfg.mode)
        if mode == "online" and not _has_api_key():
            log.warning("W&B: online mode but no API key (WANDB_API_KEY or `wandb login`): logging offline instead")
            mode = "offline"
        try:
            self.run = _wandb_init(mode=mode, init_timeout=float(wcfg.get("init_timeout", 10.0)), **kwargs)
        except Exception as e:  # the service unreachable, a bad key: never the job's problem
            if mode != "online":
                raise
            log.warning("W&B: online init failed (%s): logging offline instead", str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.run = _wandb_init(mode="offline", init_timeout=10.0, **kwargs)

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


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


def _wandb_init(init_timeout: float, **kwargs):
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(settings=wandb.Settings(init_timeout=init_timeout), **kwargs)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out
