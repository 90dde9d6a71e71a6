"""W&B mirror of a run record. Offline by default: no account, no network, never blocks.

`online` without an API key, or when the service cannot be reached within a few seconds,
falls back to offline with one warning line (`wandb sync` uploads it later): W&B never costs
a job.

What a run holds (docs/analysis.md):
- identity: group `<experiment or sweep>-<date>-<time>` of the sweep's start (one group per
  sweep, whichever process runs a point), job_type = method, tags = method, `w<bits>`,
  experiment (plus `logger.wandb.tags`), name `<model>-<method>-w<bits>` followed by the
  toggles that differ from the method's defaults;
- the resolved config;
- the final metrics in the run summary, never as history (one value per run is what a
  summary is; `define_metric` says which way is better, so a W&B sweep or a summary view takes
  the minimum perplexity);
- two tables: the record's flat columns (one row, the columns `ttvq_analysis.load_runs` has)
  and the per-layer relative error and bpw;
- the training curves of methods that train (their report's per-epoch losses and per-update
  index-change rates: TTVQ's block and PEFT training, JLCM's block training, AQLM's PV-tuning
  and per-block fine-tuning where its report has a history) as history, against their own axes;
- `result.json` as a run file, and with `logger.wandb.log_checkpoint=true` the quantized
  checkpoint as a `model` artifact.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger("ttvq")

# Record fields that describe how or where it ran, too bulky or too nested for a summary.
NOT_SUMMARY = ("config", "quantize", "versions", "device", "model_info", "calib", "linear_bits_by_buffer", "counts")
# Summary metrics and which way is better (what a sweep or a summary view should take).
METRIC_SUMMARY = {"ppl/*": "min", "kl/*": "min", "top1/*": "max", "zeroshot/average": "max"}
# Training-curve axes: per epoch of a stage, and per index update.
EPOCH_AXIS, UPDATE_AXIS = "curves/epoch", "index_change/update"


class WandbRun:
    """One W&B run per job (or per skipped sweep point, `log_skipped`).

    group: the sweep's name as the record has it (`record["sweep"]`; None for a single run).
    record: the job's record as soon as it exists (method, bits, model, config.method: the run's
    job_type, tags and name; `finish` sets name and tags again from the final record).
    experiment: default Hydra's `experiment` choice."""

    def __init__(self, wcfg, config: dict, output_dir: Path, group: str | None, record: dict,
                 *, experiment: str | None = None):
        self.run, self.wcfg, self.output_dir = None, wcfg, Path(output_dir)
        self.experiment = experiment if experiment is not None else _experiment()
        if wcfg.mode == "disabled":
            return
        kwargs = dict(project=wcfg.project, entity=wcfg.entity, group=run_group(wcfg, group, self.experiment, output_dir),
                      job_type=record.get("method"), tags=self._tags(record), name=run_name(record), config=config,
                      dir=str(output_dir), reinit="finish_previous")
        mode = str(wcfg.mode)
        if mode == "online" and not _has_api_key():
            log.warning("W&B: online mode but no API key (WANDB_API_KEY or `wandb login`): logging offline instead")
            mode = "offline"
        self.run = _start(mode, float(wcfg.get("init_timeout", 10.0)), kwargs)
        if self.run is None:
            return
        for key, how in METRIC_SUMMARY.items():
            self.run.define_metric(key, summary=how)
        for axis, keys in ((EPOCH_AXIS, "curves/*"), (UPDATE_AXIS, "index_change/*")):
            self.run.define_metric(axis)
            self.run.define_metric(keys, step_metric=axis)

    def _tags(self, record: dict) -> list[str]:
        """Method, `w<bits>`, experiment, and the configured extra tags; nothing else (toggles
        are in the name, where they do not multiply the tag list)."""
        return _tag_list([record.get("method"), f"w{record.get('bits')}", self.experiment, *self.wcfg.tags])

    def log(self, metrics: dict) -> None:
        """Metrics as they are measured (bpw, a corpus's perplexity, zero-shot): into the summary
        at once, so a job that dies later still shows what it measured."""
        if self.run is not None:
            self.run.summary.update(_flatten(metrics))

    def finish(self, record: dict, ok: bool, *, skipped: bool = False) -> None:
        """The record's summary, tables, curves and files; then the run ends, failed with exit
        code 1 when the job failed. `skipped`: a summary-only run (see `log_skipped`). Nothing
        here can fail the job: the record is written before, and a W&B error is one warning."""
        if self.run is None:
            return
        try:
            self._mirror(record, ok, skipped)
        except Exception as e:
            log.warning("W&B: the run is incomplete (%s); the record is unaffected", _first_line(e))
        finally:
            # A failed job must not show as finished-ok (wandb#4591).
            self.run.finish(exit_code=0 if ok else 1)

    def _mirror(self, record: dict, ok: bool, skipped: bool) -> None:
        import wandb

        self.run.name, self.run.tags = run_name(record), tuple(self._tags(record))
        self.run.summary.update(summary(record) | ({"skipped": True} if skipped else {}))
        result = self.output_dir / "result.json"
        if result.is_file():
            self.run.save(str(result), base_path=str(self.output_dir), policy="now")
        if not skipped:
            epochs, updates = training_curves((record.get("quantize") or {}).get("method_report") or {})
            for row in epochs + updates:
                self.run.log(row)
            flat = flat_record(record)
            tables = {"record": wandb.Table(columns=list(flat), data=[list(flat.values())])}
            layers = layer_rows(record)
            if layers:
                tables["layers"] = wandb.Table(columns=list(layers[0]), data=[list(r.values()) for r in layers])
            self.run.log(tables)
            if ok and self.wcfg.get("log_checkpoint", False):
                self._log_checkpoint(record)

    def _log_checkpoint(self, record: dict) -> None:
        import wandb

        q = record.get("quantize") or {}
        path = q.get("checkpoint")
        if not path or not Path(path).is_file():
            log.warning("W&B: logger.wandb.log_checkpoint=true but this run has no checkpoint file "
                        "(save_checkpoint=false, or a checkpoint= run): nothing logged")
            return
        art = wandb.Artifact(f"checkpoint-{q.get('content_sha') or record['run_id']}", type="model",
                             metadata={k: record.get(k) for k in ("method", "bits", "model", "bpw", "bpw_model", "run_id")}
                             | {"content_sha": q.get("content_sha"), "method_config": (record.get("config") or {}).get("method")})
        # immutable: the cache entry never changes, so W&B need not copy it to its staging area.
        art.add_file(path, name="model.safetensors", policy="immutable")
        self.run.log_artifact(art)


def log_skipped(wcfg, config: dict, output_dir: Path, record: dict, sweep: str | None = None) -> None:
    """A sweep point skipped because its run_id already has an ok record still appears in this
    sweep's group: a summary-only run (config, the record's summary with `skipped: true`, and
    result.json) named like the run that made the record. sweep: this sweep's name (default
    `config["sweep"]`), not the one in the old record. Never raises: the skip is the job's result."""
    if wcfg.mode == "disabled":
        return
    try:
        wb = WandbRun(wcfg, config, output_dir, sweep if sweep is not None else config.get("sweep"), record)
        wb.finish(record, True, skipped=True)
    except Exception as e:
        log.warning("W&B: no run for this skipped point (%s); its record is unaffected", _first_line(e))


# -------------------------------------------------------------------------------------------
# what a run is called


def run_group(wcfg, sweep: str | None, experiment: str | None, output_dir: Path) -> str | None:
    """`logger.wandb.group` when set; in a Hydra sweep `<experiment or sweep>-<date>-<time>` of
    the sweep's start; else (a single run) the sweep name the user gave, or none.

    The start is the time Hydra wrote `multirun.yaml` into the sweep dir (once, before any
    point runs), so every point agrees on it whichever process or node runs it."""
    if wcfg.group:
        return wcfg.group
    marker = Path(output_dir).parent / "multirun.yaml"
    if not marker.is_file():
        return sweep
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(marker.stat().st_mtime))
    return f"{experiment or sweep or 'sweep'}-{stamp}"


def run_name(record: dict) -> str:
    """`<model>-<method>-w<bits>`, then the toggles that differ from the method's defaults."""
    toggles = toggle_string((record.get("config") or {}).get("method") or {"name": record.get("method")})
    return f"{record.get('model')}-{record.get('method')}-w{record.get('bits')}" + (f"-{toggles}" if toggles else "")


def method_toggles(method_config: dict) -> dict:
    """The fields of a record's `config.method` that differ from its method's config dataclass
    defaults (`METHODS.get(name).Config`), nested fields with dotted keys. A method that is not
    registered here (a plugin not installed) has no known defaults: every field is returned."""
    from omegaconf import OmegaConf

    from ttvq_bench.errors import ConfigError
    from ttvq_methods.registry import METHODS

    given = _flatten({k: v for k, v in method_config.items() if k != "name"}, sep=".", lists=True)
    try:
        cls = METHODS.get(method_config.get("name"))
    except ConfigError:
        return given
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(cls.Config), enum_to_str=True), sep=".", lists=True)
    return {k: v for k, v in given.items() if k not in defaults or defaults[k] != v}


def toggle_string(method_config: dict) -> str:
    """`method_toggles` as Hydra overrides would write them: `group_size=128,act_order=true`."""
    return ",".join(f"{k}={_override_value(v)}" for k, v in method_toggles(method_config).items())


def _override_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    return str(v)


def _experiment() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None


# -------------------------------------------------------------------------------------------
# what a run holds


def summary(record: dict) -> dict:
    """The record's scalars (metrics, protocol, identity, timing), `/`-joined keys."""
    q = record.get("quantize") or {}
    return _flatten({k: v for k, v in record.items() if k not in NOT_SUMMARY}
                    | {"quantize": {k: q.get(k) for k in ("source", "content_sha")}})


def flat_record(record: dict) -> dict:
    """The record as one flat row, the columns `ttvq_analysis.load_runs` gives it (dotted keys,
    lists as JSON); the per-layer stats and the method report go to their own table and curves."""
    q = record.get("quantize") or {}
    return _flatten({k: v for k, v in record.items() if k != "quantize"}
                    | {"quantize": {k: v for k, v in q.items() if k not in ("layers", "method_report", "head_report")}},
                    sep=".", lists=True, as_json=True)


def layer_rows(record: dict) -> list[dict]:
    """Per quantized layer: name, block, kind (the linear's own name), bpw, relative error."""
    rows = []
    for name, st in ((record.get("quantize") or {}).get("layers") or {}).items():
        m = re.search(r"\.(\d+)\.", name)
        rows.append({"name": name, "block": int(m.group(1)) if m else None, "kind": name.rsplit(".", 1)[-1],
                     "bpw": st.get("bpw"), "rel_err": st.get("rel_err")})
    return rows


def training_curves(report: dict) -> tuple[list[dict], list[dict]]:
    """History rows from a method report: per epoch index one row with every stage's
    `curves/<stage>/{train,val,step_loss}`, then per index update one row with every stage's
    `index_change/<stage>` (the share of indices that update changed). Stages: `block<b>` of
    `report["blocks"]` (TTVQ's and JLCM's block training), any other entry with a history
    (TTVQ's `peft`, AQLM's `pv`), and `<entry>/block<b>` of any other per-block entry whose
    blocks have one (e.g. a per-block `finetune`)."""
    def curve(v) -> bool:
        return isinstance(v, dict) and ("history" in v or "change_rates" in v)

    stages = {f"block{b}": rep for b, rep in (report.get("blocks") or {}).items() if isinstance(rep, dict)}
    for key, v in report.items():
        if key != "blocks" and curve(v):
            stages[key] = v
        elif key != "blocks" and isinstance(v, dict):
            stages |= {f"{key}/block{b}": rep for b, rep in v.items() if str(b).isdigit() and curve(rep)}
    epochs: dict[int, dict] = {}
    updates: dict[int, dict] = {}
    for stage, rep in stages.items():
        for h in rep.get("history") or []:
            row = epochs.setdefault(int(h["epoch"]), {EPOCH_AXIS: int(h["epoch"])})
            row.update({f"curves/{stage}/{k}": v for k, v in h.items() if k != "epoch" and isinstance(v, (int, float))})
        for i, rate in enumerate(rep.get("change_rates") or [], 1):
            updates.setdefault(i, {UPDATE_AXIS: i})[f"index_change/{stage}"] = rate
    return [epochs[k] for k in sorted(epochs)], [updates[k] for k in sorted(updates)]


# -------------------------------------------------------------------------------------------
# plumbing


def _start(mode: str, init_timeout: float, kwargs: dict):
    """wandb.init; online falls back to offline; None (one warning) when W&B refuses even that."""
    try:
        return _wandb_init(mode=mode, init_timeout=init_timeout, **kwargs)
    except Exception as e:  # the service unreachable, a bad key, a setting W&B refuses: never the job's problem
        if mode != "online":
            log.warning("W&B: no run for this job (%s); its record is unaffected", _first_line(e))
            return None
        log.warning("W&B: online init failed (%s): logging offline instead", _first_line(e))
        return _start("offline", 10.0, kwargs)


def _tag_list(tags) -> list[str]:
    """Distinct, non-empty, and within W&B's 64 characters (a longer one would fail the init)."""
    return [t for t in dict.fromkeys(str(t) for t in tags if t) if len(t) <= 64]


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


def _wandb_init(init_timeout: float, **kwargs):
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(settings=wandb.Settings(init_timeout=init_timeout), **kwargs)


def _flatten(d: dict, prefix: str = "", sep: str = "/", lists: bool = False, as_json: bool = False) -> dict:
    """Scalars of a nested dict under joined keys; with `lists`, lists too (as JSON text with
    `as_json`, where a table column needs one type); None only in tables (`as_json`)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + sep, sep, lists, as_json))
        elif isinstance(v, (int, float, str, bool)) or (v is None and as_json):
            out[key] = v
        elif lists and isinstance(v, (list, tuple)):
            out[key] = json.dumps(v) if as_json else list(v)
    return out
