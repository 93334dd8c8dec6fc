"""Offline KD: the teacher's top-k next-token distribution, computed once, stored, reused.

For every position of every training row the cache holds the k most likely next tokens
under the teacher (at the recipe's temperature) and their log-probabilities; the mass
outside them is implied (1 - sum) and the loss treats it as one tail event
(`losses.forward_kl_topk`). Storage per token is k x (2-byte id + 2-byte fp16 log-prob)
when the vocabulary fits 16 bits (4-byte ids otherwise), against V x 4 bytes for full fp32
logits: 256 B vs 196 KB per token for SmolLM2 at k = 64.

The cache lives in `~/.cache/edgekit/teacher-logits/<key>.safetensors` ($EDGEKIT_CACHE),
keyed by the teacher's provenance, the exact training rows, k and the temperature, so a
second run or another student on the same data and teacher reads it instead of running
the teacher. It is written atomically; a corrupt or foreign file is rebuilt. Under
torchrun the processes build it in parallel, each its share of the rows, and rank 0 merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgekit.fsutil import atomic_path, sha256_json
from edgekit.parallel import place, train_device
from edgekit.progress import bar

FORMAT = 1


@dataclass
class TeacherCache:
    """Top-k ids (N, T-1, k) and log-probs (N, T-1, k) for rows (N, T). Ids are stored as
    int16 (minus `id_offset`, 32768 for vocabularies of up to 65536) or int32."""

    index: torch.Tensor
    logprobs: torch.Tensor
    id_offset: int
    path: Path
    built: bool  # False when read from an earlier run

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*(T-1), k) float32 log-probs and int64 ids for rows `idx`, flattened like the trainer's positions."""
        k = self.index.shape[-1]
        return self.logprobs[idx].reshape(-1, k).float(), self.index[idx].reshape(-1, k).long() + self.id_offset

    @property
    def bytes_per_token(self) -> int:
        k = self.index.shape[-1]
        return k * (self.index.element_size() + self.logprobs.element_size())


def cache_key(teacher_provenance: dict, rows: torch.Tensor, k: int, temperature: float) -> str:
    import hashlib

    rows_hash = hashlib.sha256(rows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return sha256_json({"format": FORMAT, "teacher": teacher_provenance, "rows": rows_hash, "shape": list(rows.shape),
                        "k": k, "temperature": temperature})


def cache_path(key: str) -> Path:
    from edgekit.models.sources import cache_dir

    return cache_dir() / "teacher-logits" / f"{key}.safetensors"


def load_or_build(teacher, teacher_provenance: dict, rows: torch.Tensor, k: int, temperature: float,
                  batch_size: int = 4) -> TeacherCache:
    from safetensors.torch import load_file

    path = cache_path(cache_key(teacher_provenance, rows, k, temperature))
    if path.is_file():
        try:
            t = load_file(path)
            if t["index"].shape[:2] == (rows.shape[0], rows.shape[1] - 1) and t["logprobs"].shape == t["index"].shape:
                return TeacherCache(t["index"], t["logprobs"], int(t["id_offset"]), path, built=False)
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
            pass
    from edgekit.parallel import world

    rank, size = world()
    if size > 1:  # under torchrun: each process caches its share of the rows, rank 0 merges
        return _build_in_shards(teacher, rows, k, temperature, batch_size, path, rank, size)
    index, logprobs, id_offset = _top_k(teacher, rows, k, temperature, batch_size)
    _save(path, index, logprobs, id_offset)
    return TeacherCache(index, logprobs, id_offset, path, built=True)


def _save(path: Path, index: torch.Tensor, logprobs: torch.Tensor, id_offset: int | torch.Tensor) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"index": index, "logprobs": logprobs, "id_offset": torch.as_tensor(id_offset)}, str(tmp))


def _top_k(teacher, rows: torch.Tensor, k: int, temperature: float, batch_size: int,
           desc: str = "caching teacher top-k") -> tuple[torch.Tensor, torch.Tensor, int]:
    """The teacher's top-k ids and log-probs for `rows`, and the id offset of their storage."""
    vocab = teacher.config.vocab_size
    id_dtype, id_offset = (torch.int16, 0) if vocab <= 2**15 else (torch.int16, 2**15) if vocab <= 2**16 else (torch.int32, 0)
    n, t_len = rows.shape
    index = torch.empty((n, t_len - 1, min(k, vocab)), dtype=id_dtype)
    logprobs = torch.empty((n, t_len - 1, min(k, vocab)), dtype=torch.float16)
    teacher.eval()
    device = train_device()
    place(teacher, device)
    progress = bar(n, desc, unit="row")
    with torch.no_grad():
        for i in range(0, n, batch_size):
            x = rows[i: i + batch_size, :-1].to(device)
            logits = teacher(input_ids=x).logits.float() / temperature  # (b, T-1, V)
            top, ids = torch.log_softmax(logits, -1).topk(min(k, vocab), dim=-1)
            index[i: i + batch_size] = (ids - id_offset).to(id_dtype).cpu()
            logprobs[i: i + batch_size] = top.half().cpu()
            progress.update(x.shape[0])
    progress.close()
    place(teacher, torch.device("cpu"))
    return index, logprobs, id_offset


def _build_in_shards(teacher, rows, k, temperature, batch_size, path: Path, rank: int, size: int) -> TeacherCache:
    """Process r caches rows [r*N/size, (r+1)*N/size) into `<key>.part-r-of-size`; rank 0
    concatenates the parts into the cache file and removes them. A part left by an
    interrupted build is reused."""
    from safetensors.torch import load_file

    from edgekit.parallel import barrier

    bounds = [rows.shape[0] * r // size for r in range(size + 1)]
    part = lambda r: path.with_name(f"{path.stem}.part-{r}-of-{size}.safetensors")  # noqa: E731
    if not part(rank).is_file():
        index, logprobs, id_offset = _top_k(teacher, rows[bounds[rank]: bounds[rank + 1]], k, temperature, batch_size,
                                            desc=f"caching teacher top-k (rank {rank}/{size})")
        _save(part(rank), index, logprobs, id_offset)
    barrier(size)
    if rank == 0:
        parts = [load_file(part(r)) for r in range(size)]
        _save(path, torch.cat([p["index"] for p in parts]), torch.cat([p["logprobs"] for p in parts]),
              parts[0]["id_offset"])
        for r in range(size):
            part(r).unlink()
    barrier(size)
    t = load_file(path)
    return TeacherCache(t["index"], t["logprobs"], int(t["id_offset"]), path, built=True)
