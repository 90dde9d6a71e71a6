"""`python -m ttvq_bench [overrides]` runs one job; `-m` sweeps (see README)."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ttvq_bench.config import register_configs
from ttvq_bench.errors import TTVQError
from hydra_plugins.ttvq_launcher import FAIL_ENV, LocalLauncher

log = logging.getLogger("ttvq")


@hydra.main(version_base="1.3", config_path="pkg://ttvq_conf", config_name="config")
def _job(cfg: DictConfig):
    from ttvq_bench.run import run_job

    hc = HydraConfig.get()
    try:
        return run_job(cfg, hc.runtime.output_dir)
    except TTVQError as e:
        if hc.mode.name != "MULTIRUN":
            # SystemExit passes Hydra's own reporting, so the user reads this one line only.
            print(f"error: {_one_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        _sweep_point_failed(hc, _one_line(e))
    except Exception as e:  # a bug, not the user's input: the traceback goes to the job's log
        if hc.mode.name != "MULTIRUN":
            raise
        log.exception("job %s failed", hc.job.num)
        _sweep_point_failed(hc, f"{type(e).__name__}: {_one_line(e)} (traceback in the job's log)")
    return None


def _sweep_point_failed(hc, msg: str) -> None:
    """In a sweep one bad point must not stop the others: it is recorded as failed (run_job
    wrote its record), said in one line, and counted in the summary at the end."""
    print(f"error: job {hc.job.num} ({hc.job.override_dirname}): {msg}", file=sys.stderr)
    if os.environ.get(FAIL_ENV):
        Path(os.environ[FAIL_ENV], f"job{hc.job.num}").write_text(msg)


def _one_line(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        first = f"{first.rstrip('.')}: {str(cause).strip().splitlines()[0]}"
    return first


def main() -> None:
    if sys.argv[1:2] == ["export"]:  # `ttvq-bench export checkpoint=... out=...`
        from ttvq_bench.export import main as export_main

        return export_main(sys.argv[2:])
    register_configs()
    # Hydra finds launchers by scanning installed hydra_plugins packages; an editable install is
    # not scanned, so ours is registered by hand (Hydra's documented way).
    from hydra.core.plugins import Plugins

    Plugins.instance().register(LocalLauncher)
    # Let errors reach us, so that user mistakes print one clear line instead of a traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    fail_dir = tempfile.mkdtemp(prefix="ttvq-fail-")
    os.environ[FAIL_ENV] = fail_dir
    try:
        _job()
    except (TTVQError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    failed = sorted(Path(fail_dir).iterdir())
    if failed:
        print(f"error: {len(failed)} job(s) of the sweep failed (status 'failed' in runs.jsonl)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
