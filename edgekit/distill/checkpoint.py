"""Training checkpoints that every process writes its own share of, and that resume on any
number of processes and either layout (replicated or FSDP-sharded).

    checkpoint/
      weights/shard-0000R-model-0000F-of-0000N.safetensors   rank R's shards, one file F per
                                                             decoder layer and one for the rest
      state.pt                                               step, RNG, layout (rank 0)

torch.distributed.checkpoint (DCP) plans the save: each process writes the pieces of the
weights and optimizer state it holds (its FSDP shards; replicated tensors once, deduplicated
across processes), so nothing is gathered on one process and a model too big for one
process's memory still checkpoints. The files are safetensors (DCP's Hugging Face storage),
with each shard's offsets in the file's metadata; on resume DCP reads, for each process, the
byte ranges its own shards cover, whatever layout wrote them. Nothing is unpickled: the
weights are safetensors and state.pt holds tensors and numbers (loaded weights_only).

Keys: "model/<parameter name>" and "optim/<parameter name>/<state>" (exp_avg, exp_avg_sq,
step for AdamW), names as the training root (parallel.StepRoot) gives them; a tied weight
is stored once, under its first name.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import torch

from edgekit.parallel import barrier, broadcast_object
from edgekit.errors import EdgekitError

LAYOUT = "dcp-safetensors"


def _state(root, opt) -> tuple[dict, dict, dict, dict]:
    """(model state, optimizer state, the flat tensors DCP saves or loads, the optimizer's
    non-tensor state entries). The tensors are the live ones (this process's shards), so a
    DCP load into them loads the model and optimizer in place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(root)
    optim_sd = get_optimizer_state_dict(root, opt)  # creates the optimizer's state if it has none yet
    params = dict(root.named_parameters(remove_duplicate=False))
    first = {name for name, _ in root.named_parameters()}  # a tied weight's first name only
    flat = {f"model/{k}": v for k, v in model_sd.items() if k in first or k not in params}
    extra = {}
    for name, entries in optim_sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                flat[f"optim/{name}/{key}"] = value
            else:
                extra[f"{name}/{key}"] = value
    return model_sd, optim_sd, flat, extra


def save_checkpoint(path: Path, root, opt, step: int, rank: int = 0, size: int = 1) -> None:
    """Every process writes its share into one new checkpoint folder, which replaces `path`
    only once all of it is written (a crash mid-save keeps the previous checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from edgekit.fsutil import atomic_path

    _, _, flat, extra = _state(root, opt)
    with atomic_path(path) if rank == 0 else contextlib.nullcontext() as tmp:
        if rank == 0:
            tmp.mkdir()
        folder = Path(broadcast_object(str(tmp) if rank == 0 else None, size)) / "weights"
        # one file per decoder layer (and one for the rest): DCP's safetensors writer builds each
        # file in memory before writing it, so the extra memory is one layer's share, not the process's
        files = {key: _file_of(key) for key in flat}
        writer = HuggingFaceStorageWriter(str(folder), fqn_to_index_mapping=files, save_distributed=True)
        with _one_process_is_fine():
            dcp.save(flat, storage_writer=writer, no_dist=size == 1)
        if rank == 0:
            torch.save({"step": step, "rng": torch.get_rng_state(), "layout": LAYOUT, "processes": size,
                        "optimizer_extra": extra}, tmp / "state.pt")
        barrier(size)  # every share is written before rank 0 moves the folder into place


def resume(path: Path, root, opt, rank: int, size: int) -> int:
    """The step to start from: 0 without a checkpoint, else the checkpoint's, with the
    model and optimizer loaded on every process (any number of processes, either layout)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _read_state(path) if rank == 0 else None
    if rank == 0 and state is not None:
        torch.set_rng_state(state["rng"])
    state = broadcast_object(state and {k: v for k, v in state.items() if k != "rng"}, size)
    if state is None:
        return 0
    if rank == 0:
        print(f"resuming from checkpoint at step {state['step']} (written by {state.get('processes', 1)} "
              f"process(es), read by {size})", flush=True)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException

    model_sd, optim_sd, flat, _ = _state(root, opt)
    try:
        with _one_process_is_fine():
            dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / "weights")), no_dist=size == 1)
    except (Exception, CheckpointException) as e:  # DCP names the first key it could not find or fit
        reason = next(iter(e.failures.values())) if isinstance(e, CheckpointException) else e
        reason = reason[0] if isinstance(reason, tuple) else reason  # (exception, its traceback frames)
        raise EdgekitError(f"the checkpoint {path} does not fit this model and optimizer: {reason}",
                           f"it was written for another student or optimizer: delete {path} to restart the "
                           "stage from its beginning") from e
    for key, value in state["optimizer_extra"].items():
        name, entry = key.rsplit("/", 1)
        optim_sd["state"][name][entry] = value
    set_model_state_dict(root, model_sd)
    set_optimizer_state_dict(root, opt, optim_sd)
    return int(state["step"])


def _file_of(key: str) -> int:
    """File number of a checkpoint entry: 2 + its decoder layer's index, else 1."""
    layer = re.search(r"\.layers\.(\d+)\.", key)
    return int(layer[1]) + 2 if layer else 1


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns whenever it runs without a process group, which is how one process runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _read_state(path: Path) -> dict | None:
    if not (path / "state.pt").is_file():
        return None
    state = torch.load(path / "state.pt", weights_only=True)  # tensors and numbers only: never arbitrary objects
    if state.get("layout") != LAYOUT:
        raise EdgekitError(f"{path} was written by an older edgekit, whose checkpoints this one cannot resume",
                           f"delete {path} to restart the stage from its beginning")
    return state
