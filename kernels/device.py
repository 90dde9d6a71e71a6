"""Where a Triton kernel can run: a CUDA tensor, or a CPU tensor in Triton's interpreter when a
caller asked for it.

Triton decides at decoration time (`@triton.jit`, i.e. when a kernel module is imported)
whether kernels compile for a GPU or run in the interpreter (`TRITON_INTERPRET=1`); this module
asks the decorated objects themselves, so a process where the variable was set too late is not
mistaken for an interpreting one.

CPU tensors take the Triton path only inside `cpu_interpreter()`. The interpreter is ~1000x
slower than torch and the test suite sets `TRITON_INTERPRET=1` for every test, so without this
opt-in every quantized forward of every test would silently run interpreted kernels; the kernel
tests opt in, the rest of the suite (and every CPU run) keeps the torch path.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from functools import lru_cache

import torch

_cpu_opt_in = 0  # depth of nested cpu_interpreter() blocks


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when this process's kernels were decorated for the interpreter."""
    if not triton_installed():
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from ttvq_kernels import tiles

    return isinstance(tiles.code_at, InterpretedFunction)


@contextmanager
def cpu_interpreter():
    """Let Triton kernels take CPU tensors (in the interpreter) inside this block."""
    global _cpu_opt_in
    if not interpreting():
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
                           "ttvq_kernels' kernel modules are imported")
    _cpu_opt_in += 1
    try:
        yield
    finally:
        _cpu_opt_in -= 1


def launchable(x: torch.Tensor) -> bool:
    """Can a Triton kernel take this tensor now?"""
    if not triton_installed():
        return False
    if x.is_cuda:
        return True  # compiled kernels; the interpreter also accepts CUDA tensors (slowly)
    return x.device.type == "cpu" and _cpu_opt_in > 0 and interpreting()


def name(device: torch.device | str) -> str:
    """The device in words, for records: the GPU's name, or the CPU and its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
