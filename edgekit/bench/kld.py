"""KL-divergence statistics as llama.cpp's `llama-perplexity --kl-divergence` computes them, and
its logits file (`--kl-divergence-base`), written from any scorer.

llama-perplexity splits the text into chunks of n_ctx tokens (the first replaced by BOS where the
vocabulary adds one) and scores the second half of each chunk: positions n_ctx/2 .. n_ctx-2 predict
the next token. Its base file holds, per scored position, the reference's log-probabilities packed
as uint16 over the 16 nats below the top logit (llama.cpp's format, kept here bit for bit):
  "_logits_", n_ctx (u32), n_vocab (i32), n_chunk (i32), tokens (i32 x n_chunk*n_ctx),
  then per scored position: scale (f32), min_log_prob (f32), n_vocab (rounded up to even) x u16.
Writing that file from PyTorch or x86 llama.cpp logits lets llama.cpp's own tool (on any CPU,
e.g. aarch64 under emulation) compute the KL to them, and reading it lets us compute the same
statistics in Python (`KLDStats`) for a cross-check. The format resolves KL to about 1e-6 nats
(each row's float32 offset); smaller figures are at its floor, as in llama.cpp.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgekit.errors import EdgekitError

MAGIC = b"_logits_"
SPAN = 16.0  # nats below the top logit that the file keeps


def chunks(ids: list[int], n_ctx: int, max_chunks: int | None = None) -> np.ndarray:
    """(n_chunk, n_ctx) int32 token ids, as llama-perplexity cuts a tokenized text."""
    n = len(ids) // n_ctx if max_chunks is None else min(max_chunks, len(ids) // n_ctx)
    if n < 1:
        raise EdgekitError(f"the text has {len(ids)} tokens, fewer than one chunk of {n_ctx}",
                           "give a longer text or a smaller ctx")
    return np.asarray(ids[: n * n_ctx], dtype=np.int32).reshape(n, n_ctx)


def scored(n_ctx: int) -> slice:
    """The positions whose next-token predictions llama-perplexity scores in each chunk."""
    return slice(n_ctx // 2, n_ctx - 1)


def pack(logits: np.ndarray) -> np.ndarray:
    """(rows, V) float logits -> (rows, nv) uint16 rows of llama-perplexity's base file."""
    logits = np.asarray(logits, dtype=np.float32)
    rows, vocab = logits.shape
    nv = 2 * ((vocab + 1) // 2) + 4
    out = np.zeros((rows, nv), dtype=np.uint16)
    top = logits.max(-1, keepdims=True)
    low = np.maximum(logits.min(-1, keepdims=True), top - SPAN)
    lse = np.log(np.exp((logits - top).astype(np.float64)).sum(-1, keepdims=True)).astype(np.float32)
    scale = ((top - low) / 65535.0).astype(np.float32)
    head = np.concatenate([scale, (low - top - lse).astype(np.float32)], -1)  # (rows, 2) f32
    out[:, :4] = head.view(np.uint16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(logits > low, np.rint((logits - low) / np.where(scale > 0, scale, 1)), 0)
    out[:, 4: 4 + vocab] = np.clip(q, 0, 65535).astype(np.uint16)
    return out


def unpack(rows: np.ndarray, vocab: int) -> np.ndarray:
    """(rows, nv) uint16 -> (rows, V) float32 log-probabilities (the packed approximation)."""
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)  # (rows, 2): scale, min_log_prob
    return rows[:, 4: 4 + vocab].astype(np.float32) * head[:, :1] + head[:, 1:2]


def write_logits_file(path: Path, tokens: np.ndarray, vocab: int, bos: int | None,
                      logits_of: Callable[[np.ndarray], np.ndarray], progress=None) -> None:
    """llama-perplexity's base file for `tokens` (n_chunk, n_ctx): `logits_of` maps one chunk's
    ids (with BOS first where `bos` is given, as llama-perplexity feeds it) to (n_ctx, >=V) logits."""
    n_chunk, n_ctx = tokens.shape
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Iii", n_ctx, vocab, n_chunk))
        f.write(tokens.astype("<i4").tobytes())
        for chunk in tokens:
            fed = chunk.copy()
            if bos is not None:
                fed[0] = bos
            logits = np.asarray(logits_of(fed), dtype=np.float32)[scored(n_ctx), :vocab]
            f.write(pack(logits).astype("<u2").tobytes())
            if progress is not None:
                progress.update(1)
    tmp.replace(path)


def read_logits_file(path: Path) -> tuple[np.ndarray, int, Iterator[np.ndarray]]:
    """(tokens (n_chunk, n_ctx), n_vocab, iterator of each chunk's packed rows)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:8] != MAGIC:
        raise EdgekitError(f"{path} is not a llama-perplexity logits file", "write it with --kl-divergence-base or write_logits_file")
    n_ctx, vocab, n_chunk = struct.unpack("<Iii", head[8:])
    nv = 2 * ((vocab + 1) // 2) + 4
    per_chunk = (n_ctx - 1 - n_ctx // 2) * nv
    data = np.memmap(path, dtype="<u2", mode="r", offset=20 + 4 * n_ctx * n_chunk)
    if data.size < per_chunk * n_chunk:
        raise EdgekitError(f"{path} is truncated ({data.size} of {per_chunk * n_chunk} values)", "write it again")
    tokens = np.fromfile(path, dtype="<i4", count=n_ctx * n_chunk, offset=20).reshape(n_chunk, n_ctx)
    return tokens, vocab, (np.asarray(data[i * per_chunk:(i + 1) * per_chunk]).reshape(-1, nv) for i in range(n_chunk))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64."""
    lp = np.asarray(logits, dtype=np.float64)
    lp = lp - lp.max(-1, keepdims=True)
    return lp - np.log(np.exp(lp).sum(-1, keepdims=True))


class KLDStats:
    """Accumulates what llama-perplexity --kl-divergence reports, by the same arithmetic: per
    scored position KL(base || candidate) over the base's tokens above -16 nats, same top token,
    both negative log-likelihoods. `result()` gives mean, median, p99, p99.9 and max KLD, same-top %,
    both perplexities and their ratio."""

    def __init__(self):
        self.kld: list[np.ndarray] = []
        self.same: list[np.ndarray] = []
        self.nll: list[np.ndarray] = []
        self.nll_base: list[np.ndarray] = []

    def add(self, base_logprobs: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        """base (rows, V) log-probs (e.g. `unpack`ed), candidate (rows, V) logits, next tokens (rows,)."""
        logits = np.asarray(logits, dtype=np.float64)
        lp = log_softmax(logits)
        base = np.asarray(base_logprobs, dtype=np.float64)
        keep = base > -SPAN
        p = np.where(keep, np.exp(base), 0.0)
        self.kld.append((p * np.where(keep, base - lp, 0.0)).sum(-1))
        self.same.append(base.argmax(-1) == logits.argmax(-1))
        rows = np.arange(len(targets))
        self.nll.append(-lp[rows, targets])
        self.nll_base.append(-base[rows, targets])

    def result(self) -> dict:
        kld = np.concatenate(self.kld)
        nll, nll_base = np.concatenate(self.nll), np.concatenate(self.nll_base)
        return {"kld_mean": float(kld.mean()), "kld_median": float(np.median(kld)),
                "kld_p99": float(np.percentile(kld, 99)), "kld_p999": float(np.percentile(kld, 99.9)),
                "kld_max": float(kld.max()), "same_top": float(np.concatenate(self.same).mean()),
                "ppl": math.exp(nll.mean()), "ppl_base": math.exp(nll_base.mean()),
                "ppl_ratio": math.exp(nll.mean() - nll_base.mean()), "tokens": int(kld.size)}


def compare_to_file(base_file: Path, logits_of: Callable[[np.ndarray], np.ndarray], bos: int | None,
                    progress=None) -> dict:
    """`KLDStats` of a candidate (`logits_of`, fed like `write_logits_file`) against a base file."""
    tokens, vocab, packed = read_logits_file(base_file)
    n_ctx = tokens.shape[1]
    stats = KLDStats()
    for chunk, rows in zip(tokens, packed):
        fed = chunk.copy()
        if bos is not None:
            fed[0] = bos
        logits = np.asarray(logits_of(fed), dtype=np.float32)[scored(n_ctx), :vocab]
        stats.add(unpack(rows, vocab), logits, chunk[n_ctx // 2 + 1:])
        if progress is not None:
            progress.update(1)
    return stats.result()


_LINES = {"ppl": r"Mean PPL\(Q\)\s*:\s*([\d.eE+-]+)", "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.eE+-]+)",
          "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([\d.eE+-]+)", "kld_mean": r"Mean\s+KLD:\s*([\d.eE+-]+)",
          "kld_max": r"Maximum KLD:\s*([\d.eE+-]+)", "kld_p999": r"99\.9%\s+KLD:\s*([\d.eE+-]+)",
          "kld_p99": r"99\.0%\s+KLD:\s*([\d.eE+-]+)", "kld_median": r"Median\s+KLD:\s*([\d.eE+-]+)",
          "same_top": r"Same top p:\s*([\d.eE+-]+)"}


def parse_llama_perplexity(text: str) -> dict:
    """The statistics block `llama-perplexity --kl-divergence` prints, with `KLDStats`' keys."""
    out = {}
    for key, pattern in _LINES.items():
        m = re.search(pattern, text)
        if m is None:
            raise EdgekitError(f"llama-perplexity printed no '{key}' line", "its output (last lines):\n" + text[-1500:])
        out[key] = float(m.group(1))
    out["same_top"] /= 100.0
    return out
