"""Inter-process locks on files (fcntl), for jobs that share a results or cache directory: two
identical jobs (a repeated launch, an overlapping SLURM requeue) take turns instead of racing."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger("ttvq")


@contextlib.contextmanager
def file_lock(path: Path, what: str = ""):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job that holds %s", what or path.name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
