"""Tokenize documents and pack them into fixed-length rows."""

from __future__ import annotations

import torch

from edgekit.data.documents import Document
from edgekit.errors import EdgekitError


def row_start_bos(tokenizer) -> int | None:
    """The BOS id where the tokenizer puts one before any text (Gemma, Llama; not SmolLM2 or
    Qwen): such a model has only ever seen text after BOS, and llama.cpp feeds it one first."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def pack(docs: list[Document], tokenizer, seq_len: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents (each ended by EOS) and cut into rows.

    Returns ids (N, seq_len) int64 and a mask (N, seq_len) bool that is False on context
    tokens (a chat document's turns before its final assistant reply), so losses train
    only on the reply. The tail shorter than `seq_len` is dropped; documents may span
    rows (standard packing for causal LM training). Where the tokenizer starts every text
    with BOS, every row starts with BOS (as llama-perplexity scores its chunks). A document
    of weight k is packed k times.
    """
    bos = row_start_bos(tokenizer)
    width = seq_len - (bos is not None)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[bool] = []
    for d in docs:
        doc = tokenizer(d.render(tokenizer), add_special_tokens=False)["input_ids"]
        prefix = d.prefix(tokenizer)
        n_ctx = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
        if eos is not None:
            doc = doc + [eos]
        ids.extend(doc * d.weight)  # a weighted document, its repeats one after another
        mask.extend(([False] * n_ctx + [True] * (len(doc) - n_ctx)) * d.weight)
    n = len(ids) // width
    if n == 0:
        raise EdgekitError(f"the {what} data has {len(ids)} tokens, fewer than one row of data.seq_len={seq_len}",
                           "add text or lower data.seq_len")
    rows = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    keep = torch.tensor(mask[: n * width], dtype=torch.bool).view(n, width)
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)
        keep = torch.cat([torch.zeros((n, 1), dtype=torch.bool), keep], dim=1)
    return rows, keep


def spread(rows: torch.Tensor, n: int) -> torch.Tensor:
    """`n` rows evenly spaced over `rows` (all of them when there are no more than `n`), in order:
    a calibration sample of the whole split. Its first rows alone are its first documents, so
    a training file grouped by genre or source (the general mix lists narrative first) would
    calibrate GPTQ or an importance matrix on one kind of text only."""
    if rows.shape[0] <= n:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, n).round().long()]
