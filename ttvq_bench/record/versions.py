"""What produced a result: library versions, git sha, a hash of the code itself, device."""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
import platform
import pkgutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout (editable install)
OURS = ("ttvq_bench", "ttvq_methods", "ttvq_kernels", "ttvq_analysis")


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _imports(name: str, path: Path) -> set[str]:
    """Our modules that `name` imports anywhere in its source (inside functions too; not the
    type-checking-only ones), and the packages above them (their __init__ runs on import)."""
    found = set()
    tree = ast.parse(path.read_bytes())
    for node in ast.walk(tree):  # drop `if TYPE_CHECKING:` bodies
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if not node.level else ".".join(name.split(".")[: -node.level] + [node.module])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    out = set()
    for mod in found:
        parts = mod.split(".")
        if parts[0] in OURS:
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def module_closure(roots: tuple[str, ...]) -> dict[str, Path]:
    """Our modules that `roots` import, transitively (by reading their source), with their files."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:  # a name imported from a module, not a module itself
            continue
        seen[name] = path
        todo.extend(_imports(name, path) - set(seen))
    return dict(sorted(seen.items()))


def scoped_code_hash(roots: tuple[str, ...], read=lambda p: p.read_bytes()) -> str:
    """Hash of the source of `roots` and of every module of ours they import: the code version
    of one result. Editing a method changes the hash of its own results only, never another
    method's; config yamls are not code (their values are part of the resolved config)."""
    h = hashlib.sha256()
    for name, path in module_closure(tuple(roots)).items():
        h.update(name.encode())
        h.update(read(path))
    return h.hexdigest()[:12]


@functools.lru_cache
def code_hash(roots: tuple[str, ...] | None = None) -> str:
    """`scoped_code_hash` of `roots`; None: every module of ours (the record's overall version)."""
    if roots is None:
        roots = tuple(sorted(m.name for pkg in OURS if (spec := importlib.util.find_spec(pkg))
                             for m in pkgutil.walk_packages(spec.submodule_search_locations, f"{pkg}.")))
    return scoped_code_hash(roots)


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
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # the GPU a launcher gave this job
        info["visible_gpus"] = os.environ["CUDA_VISIBLE_DEVICES"]
    info["host"] = platform.node()
    return info
