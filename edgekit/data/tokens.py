"""Tokenize documents and pack them into fixed-length rows."""

from __future__ import annotations

import torch

from edgekit.data.documents import Document
from edgekit.errors import EdgekitError


def pack(docs: list[Document], tokenizer, seq_len: int, what: str) -> torch.Tensor:
    """Concatenate documents (each ended by EOS) and cut into rows: (N, seq_len) int64.

    The tail shorter than `seq_len` is dropped; documents may span rows (standard
    packing for causal LM training).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d.render(tokenizer), add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise EdgekitError(f"the {what} data has {len(ids)} tokens, fewer than one row of data.seq_len={seq_len}",
                           "add text or lower data.seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
