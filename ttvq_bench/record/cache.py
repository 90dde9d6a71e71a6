"""Content-addressed cache with atomic, verified entries.

An entry is a directory `<root>/<kind>/<key>/` that exists only once complete: it is built
under a temporary sibling name and renamed into place, so a job killed half-way leaves no
entry (only a `.tmp-*` directory, removed by `clean_tmp` once its writer is gone). Its marker
file `.complete` lists the sha256 of every file written; `lookup` checks them, so a damaged
entry (a truncated or overwritten file) is reported in one warning line, discarded and built
again, never used. Files get the permissions the user's umask gives, so a team (or SLURM jobs
of several users) can share one cache.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from ttvq_bench.record.locks import file_lock

log = logging.getLogger("ttvq")
_HOST = socket.gethostname().replace("-", "_")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def tmp_prefix(name: str) -> str:
    """Prefix of a temporary name: it says which host and process may still be writing it."""
    return f".tmp-{name}-{_HOST}-{os.getpid()}-"


class Cache:
    """read_only: a reader that never changes the shared cache (the non-zero ranks of a torchrun
    job): entries it builds go to a private temporary directory, its locks are no-ops (the
    writer holds them while the group computes together) and it never discards or cleans."""

    def __init__(self, root: str | Path, enabled: bool = True, read_only: bool = False):
        self.root = Path(root)
        self.enabled = enabled
        self.read_only = read_only
        self._private: Path | None = None
        if read_only:
            self._private = Path(tempfile.mkdtemp(prefix="ttvq-private-cache-"))
            atexit.register(shutil.rmtree, self._private, True)

    @property
    def _write_root(self) -> Path:
        return self._private if self._private is not None else self.root

    def path(self, kind: str, key: str) -> Path:
        if self._private is not None and (self._private / kind / key).exists():
            return self._private / kind / key
        return self.root / kind / key

    def work_dir(self, key: str) -> Path:
        """Per-block resume state of quantization `key` (read by every rank, written by rank 0)."""
        return self.root / "work" / key

    def lookup(self, kind: str, key: str) -> Path | None:
        """The entry's directory if it exists and its files are intact; a damaged entry is
        removed (one warning) and None returned, so the caller builds it again."""
        if not self.enabled:
            return None
        entry = self.path(kind, key)
        marker = entry / ".complete"
        if not marker.is_file():
            return None
        problem = None
        manifest = _read_or_none(marker)
        try:
            files = json.loads(manifest)["files"]
            for rel, sha in files.items():
                f = entry / rel
                if not f.is_file():
                    problem = f"{rel} is missing"
                elif _sha256(f) != sha:
                    problem = f"{rel} does not match the hash written with it"
                if problem:
                    break
        except (ValueError, KeyError, TypeError, OSError):
            problem = "its manifest is unreadable"
        if problem is None:
            return entry
        log.warning("cache entry %s/%s is damaged (%s): discarded, building it again", kind, key, problem)
        if self.read_only and entry != self._private / kind / key:
            return None  # the writer discards it
        with self._publish_lock(kind):
            if _read_or_none(marker) == manifest:  # not replaced by a good entry meanwhile
                _discard(entry)
        return None

    def has(self, kind: str, key: str) -> bool:
        return self.lookup(kind, key) is not None

    @contextlib.contextmanager
    def writing(self, kind: str, key: str) -> Iterator[Path]:
        """Yield a fresh temporary directory; on success it becomes the entry atomically."""
        final = self._write_root / kind / key
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(key), dir=final.parent))
        try:
            yield tmp
            files = {}
            mode = 0o666 & ~_umask()
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                os.chmod(f, mode)
                files[str(f.relative_to(tmp))] = _sha256(f)
            (tmp / ".complete").write_text(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}))
            os.chmod(tmp / ".complete", mode)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
            # Writers of one kind publish one at a time: without the lock a writer could remove
            # an entry another job had just published and was reading.
            with self._publish_lock(kind):
                if (final / ".complete").exists():  # another job finished the same entry first: keep theirs
                    shutil.rmtree(tmp)
                    return
                _discard(final)  # a leftover without a marker
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_or_create(self, kind: str, key: str, build: Callable[[Path], None]) -> Path:
        """Return the entry directory, building it with `build(tmpdir)` when missing or damaged."""
        if (entry := self.lookup(kind, key)) is not None:
            return entry
        with self.writing(kind, key) as tmp:
            build(tmp)
        return self.path(kind, key)

    def _publish_lock(self, kind: str):
        return file_lock(self._write_root / "locks" / f"publish-{kind}.lock", what=f"the cache's {kind} entries")

    def lock(self, name: str):
        """An exclusive lock shared by every job that uses this cache directory."""
        if self.read_only:
            return contextlib.nullcontext()
        return file_lock(self.root / "locks" / f"{name}.lock", what=name)

    def clean_tmp(self, older_than_s: float = 24 * 3600) -> int:
        """Remove leftovers of killed writers: temporaries whose process on this host is gone,
        and any older than `older_than_s`. Returns how many."""
        if self.read_only:
            return 0
        return clean_tmp(self.root.glob("*/.tmp-*"), older_than_s) + clean_tmp(self.root.glob("*/*/.tmp-*"), older_than_s)


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _discard(entry: Path) -> None:
    """Move the entry out of its name in one step, then delete it: no reader ever sees half of it."""
    if not entry.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=tmp_prefix(entry.name + "-discarded"), dir=entry.parent))
    os.rename(entry, trash / "entry")
    shutil.rmtree(trash, ignore_errors=True)


def _writer_gone(name: str) -> bool:
    parts = name.split("-")
    for i, p in enumerate(parts[:-1]):
        if p == _HOST and parts[i + 1].isdigit():
            try:
                os.kill(int(parts[i + 1]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
    return False


def clean_tmp(paths, older_than_s: float = 24 * 3600) -> int:
    n = 0
    now = time.time()
    for p in paths:
        try:
            stale = _writer_gone(p.name) or now - p.stat().st_mtime > older_than_s
        except FileNotFoundError:
            continue
        if stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n
