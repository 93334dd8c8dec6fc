"""Decode speed against its physical limit: memory bandwidth / bytes read per token.

Decoding one token reads every weight once (the KV cache is small at short context), so
tokens/s <= bandwidth / weight bytes. We measure this machine's bandwidth, report each
model's ceiling and the measured share of it. Devices that cannot run here are predicted
(`predict_decode`) from bounds calibrated on published measurements on each device, never from
the share measured here: a model that fits this CPU's cache reaches shares a device's DRAM cannot.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def measure_bandwidth_gbs(threads: int = 1, size_mb: int = 512, repeats: int = 5) -> float:
    """Best-of-N read bandwidth of a buffer far beyond the caches, read by `threads` threads at
    once (each sums its slice; numpy releases the GIL), as decoding reads its weights. Measure
    with the thread count the decode runs with: one thread reads about half of what two do here."""
    src = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(src, max(1, threads))
    best = float("inf")
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return src.nbytes / best / 1e9


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache on this machine (Linux sysfs), or None where it is not exposed."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=None)


def bytes_per_token(gguf: Path) -> int:
    """Weight bytes one decode step reads: every tensor, except that only one row of an
    untied token embedding is read (a tied one is read whole, as the output layer).
    For an ONNX folder: its weight files (an upper bound: its embedding is counted whole)."""
    from edgekit.formats.gguf_read import tensor_table

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


def weights_per_token(gguf: Path) -> int:
    """Weights one decode step multiplies (2 FLOPs each): every matrix but the token embedding,
    which is only looked up, unless it is tied and so also the output layer. For an ONNX folder
    the int4 estimate 2 x weight bytes (an upper bound where some nodes are 8-bit)."""
    from edgekit.formats.gguf_read import tensor_table

    if gguf.is_dir():
        return 2 * bytes_per_token(gguf)
    tensors = tensor_table(gguf)
    names = {t["name"] for t in tensors}
    total = 0
    for t in tensors:
        if len(t["shape"]) < 2 or (t["name"] == "token_embd.weight" and "output.weight" in names):
            continue
        total += int(np.prod(t["shape"]))
    return total


def predict_decode(profile: dict, bytes_per_tok: float, weights: float) -> dict:
    """A device's decode tokens/s from its calibrated bounds (targets.yaml): the lower of the
    memory bound (effective bandwidth / bytes read) and the compute bound (effective int8 rate /
    2 ops per weight). A model whose weights fit the device's last-level cache is not held by
    DRAM bandwidth: the compute bound alone predicts it. The roofline is the same pair of bounds
    at the device's peaks (peak bandwidth, peak int8 rate); the prediction never exceeds it."""
    in_cache = bytes_per_tok <= profile["cache_mb"] * 2**20
    compute = profile["effective_gops"] * 1e9 / (2 * weights)
    memory = float("inf") if in_cache else profile["effective_bandwidth_gbs"] * 1e9 / bytes_per_tok
    roof = min(profile["peak_gops"] * 1e9 / (2 * weights),
               float("inf") if in_cache else profile["bandwidth_gbs"] * 1e9 / bytes_per_tok)
    tps = min(memory, compute)
    return {"decode_tps": tps, "roofline_tps": roof, "roofline_share": tps / roof, "cache_resident": in_cache,
            "bound": "compute" if compute < memory else "memory", "bandwidth_gbs": profile["bandwidth_gbs"],
            "effective_bandwidth_gbs": profile["effective_bandwidth_gbs"], "effective_gops": profile["effective_gops"],
            "calibration": [m["source"] for m in profile.get("measured", [])]}


def roofline(decode_tps: float, gguf: Path, bandwidth_gbs: float) -> dict:
    """Ceiling and measured share. A model whose weights fit in the last-level cache is not
    bound by memory bandwidth, so its share can pass 100%: such rows say `cache_resident`."""
    per_token = bytes_per_token(gguf)
    ceiling = bandwidth_gbs * 1e9 / per_token
    cache = last_level_cache_bytes()
    return {"bandwidth_gbs": round(bandwidth_gbs, 2), "bytes_per_token": per_token,
            "roofline_tps": ceiling, "roofline_share": decode_tps / ceiling,
            "cache_resident": cache is not None and per_token <= cache}
