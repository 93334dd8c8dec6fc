"""Tokenize documents and pack them into fixed-length rows."""

from __future__ import annotations

import torch

from edgekit.data.documents import Document
from edgekit.errors import EdgekitError


def pack(docs: list[Document], tokenizer, seq_len: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents (each ended by EOS) and cut into rows.

    Returns ids (N, seq_len) int64 and a mask (N, seq_len) bool that is False on context
    tokens (a chat document's turns before its final assistant reply), so losses train
    only on the reply. The tail shorter than `seq_len` is dropped; documents may span
    rows (standard packing for causal LM training).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[bool] = []
    for d in docs:
        doc = tokenizer(d.render(tokenizer), add_special_tokens=False)["input_ids"]
        prefix = d.prefix(tokenizer)
        n_ctx = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
        if eos is not None:
            doc = doc + [eos]
        ids.extend(doc)
        mask.extend([False] * n_ctx + [True] * (len(doc) - n_ctx))
    n = len(ids) // seq_len
    if n == 0:
        raise EdgekitError(f"the {what} data has {len(ids)} tokens, fewer than one row of data.seq_len={seq_len}",
                           "add text or lower data.seq_len")
    return (torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len),
            torch.tensor(mask[: n * seq_len], dtype=torch.bool).view(n, seq_len))
