"""One job on several processes, as torchrun starts it (`torchrun --nproc_per_node N -m
ttvq_bench ...`): each process joins the process group torchrun describes (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), on its own GPU (cuda:LOCAL_RANK, NCCL) or on the CPU
(gloo). Every process runs the whole job on the same data with the same seeds; the
distillation loops split each minibatch across the processes and sum the gradients
(methods/distill.py), so the state stays identical everywhere. Rank 0 alone writes: cache
entries, checkpoints, the per-block resume state, runs.jsonl, result.json and W&B; the other
ranks read the cache (so every rank takes the same path: a resumed block, a cached
checkpoint) and keep what they build in a private temporary directory."""
from __future__ import annotations

import os

import torch


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_writer() -> bool:
    return world()[0] == 0


def join(device: torch.device) -> tuple[torch.device, dict | None]:
    """Join torchrun's process group (when there is one): this process's device and what the
    record says about the group (None for a single process)."""
    rank, size, local = world()
    if size == 1:
        return device, None
    import torch.distributed as dist

    backend = "gloo"
    if device.type == "cuda":
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)  # env:// from torchrun's variables
    return device, {"world_size": size, "backend": backend}


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
