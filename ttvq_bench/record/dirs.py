"""Where a job writes (results, cache, its output dir) is checked before any work: a read-only
or full directory is one line at the start, not a failure after an hour of quantization."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ttvq_bench.errors import DataError
from ttvq_bench.record.cache import clean_tmp, tmp_prefix

MIN_FREE_MB = 64  # below this a directory counts as full (a record, a checkpoint header, locks)


def check_writable(dirs: dict[str, Path], min_free_mb: int = MIN_FREE_MB) -> None:
    """`dirs`: config key -> directory. Creates each, writes and removes a probe file, and checks
    the free space; also clears temporaries that killed jobs left there."""
    for key, d in dirs.items():
        d = Path(d)
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f"{tmp_prefix('probe')}w"
            with open(probe, "wb") as f:
                f.write(b"ttvq")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            raise DataError(f"{key}={d} is not writable ({e.strerror or type(e).__name__}): "
                            f"point {key} at a directory you can write") from None
        free_mb = shutil.disk_usage(d).free / 2**20
        if free_mb < min_free_mb:
            raise DataError(f"{key}={d} has {free_mb:.0f} MB free, less than the {min_free_mb} MB a job needs: free some space")
        clean_tmp(d.glob(".tmp-*"))
