"""Data-parallel training under torchrun: each process takes its share of every global
batch, gradients are averaged across processes before clipping and the optimizer step,
so every process holds the same student and optimizer state.

    torchrun --standalone --nproc-per-node 2 -m edgekit.cli run RECIPE

Backend: NCCL on GPUs, gloo on CPUs. The teacher is replicated and frozen. Gradients are
averaged explicitly (one flat all-reduce per step) rather than through DDP's hooks: the
fused KD loss calls the model's trunk and head directly, which DDP's forward wrapper would
not see, and averaging once per step also covers gradient accumulation. Because state is
replicated, rank 0's checkpoint is the whole state and resumes on any number of processes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun. Initialises the process group once."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(idx: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This process's rows of a global micro-batch (B,) -> (B/size,)."""
    return idx[rank::size]


def average_gradients(params: list[torch.Tensor], size: int) -> None:
    """Average .grad over processes: one flat all-reduce (params without grad count as zero)."""
    if size <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(g).clone()
        offset += n


def mean_scalars(values: dict[str, float], size: int) -> dict[str, float]:
    """The mean of per-process numbers (losses for the log), identical on every process."""
    if size <= 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / size).tolist()))


def barrier(size: int) -> None:
    if size > 1:
        dist.barrier()


def broadcast_object(obj, size: int):
    """Rank 0's `obj` on every process (our own process group: pickling here is not
    loading an untrusted file)."""
    if size <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_training_state(model, opt, start: int, size: int) -> int:
    """Make every process start from rank 0's weights, optimizer state and step (rank 0 alone
    reads checkpoints): a run resumes on any number of processes."""
    if size <= 1:
        return start
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)
    state = broadcast_object(opt.state_dict() if dist.get_rank() == 0 else None, size)
    if dist.get_rank() != 0:
        opt.load_state_dict(state)
    return int(broadcast_object(start, size))
