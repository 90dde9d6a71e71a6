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

log = logging.getLogger("ttvq")
_FAIL_ENV = "TTVQ_FAILURE_DIR"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
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
        # In a sweep one bad point must not stop the others: it is recorded as failed, and
        # the sweep exits non-zero at the end.
        log.error("job %s failed: %s", hc.job.num, e)
        print(f"error: job {hc.job.num} ({hc.job.override_dirname}): {e}", file=sys.stderr)
        if os.environ.get(_FAIL_ENV):
            Path(os.environ[_FAIL_ENV], f"job{hc.job.num}").write_text(str(e))
        return None


def _one_line(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        first = f"{first.rstrip('.')}: {str(cause).strip().splitlines()[0]}"
    return first


def main() -> None:
    register_configs()
    # Let errors reach us, so that user mistakes print one clear line instead of a traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    fail_dir = tempfile.mkdtemp(prefix="ttvq-fail-")
    os.environ[_FAIL_ENV] = fail_dir
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
