"""Content-addressed cache with atomic writes.

An entry is a directory `<root>/<kind>/<key>/` that exists only once complete: it is built
under a temporary sibling name and renamed into place, so a job killed half-way leaves no
entry (only a `.tmp-*` directory that the next writer ignores and `clean_tmp` removes).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator


class Cache:
    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        return self.enabled and (self.path(kind, key) / ".complete").exists()

    @contextlib.contextmanager
    def writing(self, kind: str, key: str) -> Iterator[Path]:
        """Yield a fresh temporary directory; on success it becomes the entry atomically."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
        # mkdtemp makes 0700; a cache shared by a team (or SLURM jobs of another user) must be
        # readable like any directory made under the user's umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        try:
            yield tmp
            (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            if final.exists():  # another job finished the same entry first: keep theirs
                shutil.rmtree(tmp)
                return
            try:
                os.rename(tmp, final)
            except OSError:  # lost a race with a parallel writer
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_or_create(self, kind: str, key: str, build: Callable[[Path], None]) -> Path:
        """Return the entry directory, building it with `build(tmpdir)` when missing."""
        if self.has(kind, key):
            return self.path(kind, key)
        with self.writing(kind, key) as tmp:
            build(tmp)
        return self.path(kind, key)

    def clean_tmp(self, older_than_s: float = 24 * 3600) -> int:
        """Remove leftovers of killed writers; returns how many."""
        n = 0
        now = time.time()
        for p in self.root.glob("*/.tmp-*"):
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n
