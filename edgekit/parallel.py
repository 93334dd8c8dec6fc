"""Data-parallel training under torchrun: each process takes its share of every global
batch; gradients are averaged across processes before clipping and the optimizer step.

    torchrun --standalone --nproc-per-node 2 -m edgekit.cli run RECIPE

Backend: NCCL on GPUs, gloo on CPUs. Two ways to hold the models (recipe `parallel:`):

- replicated (default): every process holds the whole student and optimizer state;
  gradients are averaged explicitly (one flat all-reduce per step) rather than through
  DDP's hooks: the fused KD loss calls the model's trunk and head directly, which DDP's
  forward wrapper would not see, and averaging once per step also covers accumulation.
- sharded: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each decoder
  layer and the rest of the student (embeddings, final norm, output head, hidden-state
  projections) over the processes; parameters, gradients and optimizer state each take
  1/N of the memory, and a layer is gathered only while it computes. The whole micro-step
  runs inside the root's forward (`StepRoot`), so the fused loss finds the output head
  gathered. The frozen teacher can be sharded the same way, layer by layer.

Checkpoints (distill/checkpoint.py): every process writes its own shards through
torch.distributed.checkpoint, and a run resumes on any number of processes and with
either layout.
"""

from __future__ import annotations

import atexit
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun. Initialises the process group once."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_initialized():
        train_device()  # one GPU per process, chosen before NCCL starts
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        _leave_at_exit()
    return dist.get_rank(), dist.get_world_size()


def _leave_at_exit() -> None:
    """Destroy the process group when the process ends normally. Left to the interpreter's
    teardown, gloo's worker threads can outlive it and abort the process (SIGABRT,
    "terminate called without an active exception") after a finished run. Not after an
    uncaught exception: other processes may still be inside a collective, and NCCL's
    teardown would wait for them."""
    crashed = []
    previous_hook = sys.excepthook

    def hook(*exc_info):
        crashed.append(True)
        previous_hook(*exc_info)

    def leave():
        if not crashed and dist.is_initialized():
            dist.destroy_process_group()

    sys.excepthook = hook
    atexit.register(leave)


def train_device() -> torch.device:
    """This process's GPU (torchrun's LOCAL_RANK picks which) when there is one, else the CPU."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def place(model, device: torch.device) -> None:
    """Move a model to `device`, unless bitsandbytes placed it at load (its 4/8-bit layers
    cannot be moved afterwards; transformers' device_map put them on the GPU already)."""
    if model is not None and getattr(model, "hf_quantizer", None) is None:
        model.to(device)


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
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
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


class StepRoot(nn.Module):
    """Everything the optimizer trains (the student and the hidden-state projections) under
    one root, whose forward runs a closure: under FSDP the root's own parameters (embeddings,
    output head, projections) are gathered for the whole micro-step and its gradients are
    reduce-scattered after backward. Unsharded, it is a plain container. Parameter names
    are the same either way ("student.…", "hidden.…"), so checkpoints move between layouts."""

    def __init__(self, student: nn.Module, hidden: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.hidden = hidden

    def forward(self, fn):
        return fn()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def shard_student(root: StepRoot) -> None:
    """FSDP2: each student decoder layer its own unit, the rest in the root unit; each unit's
    shards land on this process's device (FSDP moves them as it shards)."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(root.student):
        fully_shard(layer)
    fully_shard(root)


def shard_teacher(teacher: nn.Module, device: torch.device) -> None:
    """FSDP2 on the frozen teacher's decoder layers (gathered one at a time for its forward,
    released after; each layer's shard lands on `device` as it is sharded); its embeddings,
    final norm and output head stay whole on every process, where the fused loss reads
    them, and move to `device` after."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(teacher):
        fully_shard(layer, reshard_after_forward=True)
    if not on_meta(teacher):  # a skeleton is allocated on the device as it is filled (fill_from_rank0)
        teacher.to(device)  # the rest; the sharded layers are there already (a no-op for them)


def return_freed_host_memory() -> bool:
    """Have glibc's malloc give each allocation of 1 MiB or more its own mapping, returned to
    the system when freed. By default glibc raises that threshold as big blocks are freed
    (up to 32 MiB) and keeps what is freed below it in its heap, where FSDP's per-layer
    gather buffers, freed and re-made every layer between the gradient shards kept, fragment
    it: 2 sharded CPU processes peaked at 3219/3163 MB with glibc's default, 2303/1881 MB
    with this, on the 135M pair (benchmarks/parallel_kd.py), at ~20% lower speed (fresh
    mappings fault their pages in). Only sharded CPU runs call it: sharding is chosen for
    memory. A MALLOC_MMAP_THRESHOLD_ set by the user wins; a C library other than glibc is
    left alone. Returns whether it applied."""
    import ctypes

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # glibc's malloc.h
    return mallopt(m_mmap_threshold, 1 << 20) == 1


def is_sharded(root: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(root, FSDPModule)


def scalar(t) -> float:
    """A float from a tensor that may be a DTensor (FSDP's gradient norm)."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def holds_shards(model: nn.Module | None) -> bool:
    """Has FSDP sharded (some of) this model's parameters over the processes?"""
    from torch.distributed.tensor import DTensor

    return model is not None and any(isinstance(p, DTensor) for p in model.parameters())


def gathered_weights(model: nn.Module) -> dict | None:
    """A sharded (FSDP) model's whole weights, keyed like its state_dict, on rank 0 and {}
    on the others; None for a model that is not sharded. Every process must call it: the
    shards are all-gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not holds_shards(model):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def skeleton(model: nn.Module | None, size: int) -> nn.Module:
    """Rank 0 passes its loaded `model` and gets it back; the other processes pass None and
    get the same architecture and dtype on the meta device, which holds no memory. Sharding
    then gives each process only its shards to allocate, and `fill_from_rank0` copies rank
    0's values into them: a process never holds a whole model it will shard."""
    from transformers import AutoModelForCausalLM

    spec = broadcast_object((model.config, model.dtype) if model is not None else None, size)
    if model is not None:
        return model
    config, dtype = spec
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def on_meta(model: nn.Module | None) -> bool:
    return model is not None and any(p.is_meta for p in model.parameters())


def fill_from_rank0(model: nn.Module, whole: dict | None, device: torch.device) -> None:
    """After sharding: every process's `model` takes rank 0's values. Rank 0 passes its
    state dict from before sharding (`whole`), the others None; processes built on the meta
    device (`skeleton`) allocate their shards on `device` first. Buffers (rotary
    frequencies, which state dicts leave out) are broadcast too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if on_meta(model):
        model.to_empty(device=device)  # new tensors for plain parameters: tied weights come apart
        for part in model.modules():
            if hasattr(part, "tie_weights") and hasattr(part, "config"):
                part.tie_weights()  # the output head shares the embeddings again (one copy, as on rank 0)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole if dist.get_rank() == 0 else {}, options=options)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
