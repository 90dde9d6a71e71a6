"""What produced a result: library versions, git sha, a hash of the code itself, device."""
from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout (editable install)
_CODE_DIRS = ("ttvq_bench", "methods", "kernels", "conf")


@functools.lru_cache
def code_hash() -> str:
    """Hash of every source and config file of the harness: the code version in run_id
    (a git sha misses uncommitted edits; this does not)."""
    h = hashlib.sha256()
    for d in _CODE_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(ROOT)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:12]


@functools.lru_cache
def git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "lm_eval": _version("lm_eval"),
        "triton": _version("triton"),
        "ttvq_bench": _version("ttvq-bench"),
        "git_sha": git_sha(),
        "code_hash": code_hash(),
    }


def device_info() -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
