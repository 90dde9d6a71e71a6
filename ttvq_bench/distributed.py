"""One job on several processes, as torchrun starts it (`torchrun --nproc_per_node N -m
ttvq_bench ...`): each process joins the process group torchrun describes (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), on its own GPU (cuda:LOCAL_RANK, NCCL) or on the CPU
(gloo). Every process runs the whole job on the same data with the same seeds, and the work
that dominates time is split: the distillation loops split each minibatch across the
processes and sum the gradients (methods/distill.py); the linears of one group of a block are
quantized on different processes when the method allows it (`Method.parallel_layers`: each
linear's result depends only on its weight and Hessian) and then sent to all; perplexity, KL
and zero-shot score each process's share and sum. So the state stays identical everywhere.
Rank 0 alone writes: cache entries, checkpoints, the per-block resume state, runs.jsonl,
result.json and W&B; the other ranks read the cache (so every rank takes the same path: a
resumed block, a cached checkpoint) and keep what they build in a private temporary directory."""
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
    if group()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def group() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int) -> range:
    """This process's contiguous share of n items (all of them outside a group)."""
    rank, size = group()
    per, extra = divmod(n, size)
    lo = rank * per + min(rank, extra)
    return range(lo, lo + per + (rank < extra))


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(*values: float) -> list[float]:
    """The values summed over the group, in float64 (themselves outside one)."""
    if group()[1] == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj, src: int):
    """`obj` of process `src`, on every process (pickled: send host tensors; outside a group,
    obj itself)."""
    if group()[1] == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather_lists(items: list) -> list:
    """Every process's list, concatenated in rank order, on every process (pickled)."""
    size = group()[1]
    if size == 1:
        return list(items)
    import torch.distributed as dist

    boxes = [None] * size
    dist.all_gather_object(boxes, list(items))
    return [x for box in boxes for x in box]
