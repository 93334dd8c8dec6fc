"""Decode speed against its physical limit: memory bandwidth / bytes read per token.

Decoding one token reads every weight once (the KV cache is small at short context), so
tokens/s <= bandwidth / weight bytes. We measure this machine's bandwidth, report each
model's ceiling and the measured share of it, and predict other devices from their
published bandwidth times the share measured here (labelled a prediction).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def measure_bandwidth_gbs(size_mb: int = 256, repeats: int = 5) -> float:
    """Best-of-N copy bandwidth (read + write bytes) of a buffer well beyond the caches."""
    src = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def bytes_per_token(gguf: Path) -> int:
    """Weight bytes one decode step reads: every tensor, except that only one row of an
    untied token embedding is read (a tied one is read whole, as the output layer).
    For an ONNX folder: its weight files (an upper bound: its embedding is counted whole)."""
    from edgekit.export.gguf_read import tensor_table

    if gguf.is_dir():
        return sum(f.stat().st_size for f in gguf.iterdir() if f.suffix in (".onnx", ".data"))

    tensors = tensor_table(gguf)
    names = {t["name"] for t in tensors}
    total = 0
    for t in tensors:
        if t["name"] == "token_embd.weight" and "output.weight" in names:
            total += t["bytes"] // max(1, t["shape"][-1] if len(t["shape"]) > 1 else 1)
        else:
            total += t["bytes"]
    return total


def roofline(decode_tps: float, gguf: Path, bandwidth_gbs: float) -> dict:
    ceiling = bandwidth_gbs * 1e9 / bytes_per_token(gguf)
    return {"bandwidth_gbs": round(bandwidth_gbs, 2), "bytes_per_token": bytes_per_token(gguf),
            "roofline_tps": ceiling, "roofline_share": decode_tps / ceiling}
