"""Benchmark GGUF files on target profiles: measured rows, roofline share, predictions."""

from __future__ import annotations

from pathlib import Path

from edgekit.bench.roofline import measure_bandwidth_gbs, roofline
from edgekit.bench.speed import measure, model_size
from edgekit.bench.targets import target
from edgekit.progress import status


def backend(path: Path) -> str:
    return "onnxruntime" if path.is_dir() else "llama.cpp"


def bench_files(files: list[Path], targets: list[str], prompt_tokens: int, gen_tokens: int, repeats: int) -> list[dict]:
    profiles = [target(t) for t in targets]  # unknown names fail before any measurement
    with status("measuring this machine's memory bandwidth"):
        bandwidth = measure_bandwidth_gbs()
    rows = []
    for path in files:
        measured_share = None
        for prof in [p for p in profiles if not p.get("predict_only")]:
            with status(f"benchmarking {path.name} on '{prof['name']}' ({prof['threads']} threads)"):
                r = measure(path, prof["threads"], prompt_tokens, gen_tokens, repeats)
            r.update(roofline(r["decode_tps"], path, bandwidth))
            measured_share = measured_share or r["roofline_share"]
            if prof.get("memory_budget_mb"):
                r["fits_memory_budget"] = r["peak_rss_mb"] <= prof["memory_budget_mb"]
            rows.append({"file": path.name, "backend": backend(path), "target": prof["name"], "predicted": False, **r})
        for prof in [p for p in profiles if p.get("predict_only")]:
            share = measured_share if measured_share is not None else 0.5
            ceiling = roofline(1.0, path, prof["bandwidth_gbs"])
            rows.append({"file": path.name, "backend": backend(path), "target": prof["name"], "predicted": True,
                         "decode_tps": share * ceiling["roofline_tps"], "roofline_tps": ceiling["roofline_tps"],
                         "roofline_share": share, "bandwidth_gbs": prof["bandwidth_gbs"],
                         "bytes_per_token": ceiling["bytes_per_token"], "size_mb": model_size(path) / 2**20,
                         "share_source": "measured here" if measured_share is not None else "assumed 50% (no runnable target given)"})
    return rows
