"""Benchmark GGUF files on target profiles: measured rows, roofline share, predictions."""

from __future__ import annotations

from pathlib import Path

from edgekit.bench.roofline import bytes_per_token, measure_bandwidth_gbs, predict_decode, roofline, weights_per_token
from edgekit.bench.speed import measure, model_size
from edgekit.bench.targets import target
from edgekit.progress import status


def backend(path: Path) -> str:
    return "onnxruntime" if path.is_dir() else "llama.cpp"


def bench_files(files: list[Path], targets: list[str], prompt_tokens: int, gen_tokens: int, repeats: int,
                cross_check: bool = False) -> list[dict]:
    """Rows per file and target. `cross_check`: each measured GGUF row also gets llama.cpp's own
    llama-bench figures for the same file, threads and lengths, run right after ours."""
    profiles = [target(t) for t in targets]  # unknown names fail before any measurement
    if cross_check:
        require_llama_bench()
    bandwidth: dict[int, float] = {}  # by thread count, measured once each
    rows = []
    for path in files:
        for prof in [p for p in profiles if not p.get("predict_only")]:
            with status(f"benchmarking {path.name} on '{prof['name']}' ({prof['threads']} threads)"):
                r = measure(path, prof["threads"], prompt_tokens, gen_tokens, repeats)
            if cross_check and backend(path) == "llama.cpp":
                with status(f"cross-checking {path.name} with llama-bench, alternately ({r['threads']} threads)"):
                    r = _cross_checked(r, path, prompt_tokens, gen_tokens, repeats)
            if r["threads"] not in bandwidth:
                with status(f"measuring this machine's memory read bandwidth ({r['threads']} threads)"):
                    bandwidth[r["threads"]] = measure_bandwidth_gbs(r["threads"])
            r.update(roofline(r["decode_tps"], path, bandwidth[r["threads"]]))
            if prof.get("memory_budget_mb"):
                r["fits_memory_budget"] = r["peak_rss_mb"] <= prof["memory_budget_mb"]
            rows.append({"file": path.name, "backend": backend(path), "target": prof["name"], "predicted": False, **r})
        for prof in [p for p in profiles if p.get("predict_only")]:
            pred = predict_decode(prof, bytes_per_token(path), weights_per_token(path))
            rows.append({"file": path.name, "backend": backend(path), "target": prof["name"], "predicted": True,
                         "bytes_per_token": bytes_per_token(path), "size_mb": model_size(path) / 2**20, **pred})
    return rows


def require_llama_bench() -> None:
    from edgekit.bench.llama_bench import llama_bench_bin
    from edgekit.errors import EdgekitError

    if llama_bench_bin() is None:
        raise EdgekitError("llama-bench is not built", "run `bash third_party/build_llama_tools.sh` once (~7 min), then retry")


def _cross_checked(first: dict, path: Path, prompt_tokens: int, gen_tokens: int, repeats: int, rounds: int = 3) -> dict:
    """Ours and llama-bench alternately, `rounds` times each, on the same file and settings; both
    sides' figures become medians over the rounds (a shared machine drifts by 10-25% between runs
    a few seconds apart, more than the difference being checked)."""
    import statistics

    from edgekit.bench.llama_bench import llama_bench

    ours, theirs = [first], []
    for i in range(rounds):
        if i:
            ours.append(measure(path, first["threads"], prompt_tokens, gen_tokens, repeats))
        theirs.append(llama_bench(path, first["threads"], prompt_tokens, gen_tokens, max(repeats, 3)))
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    spread = lambda rows, k: (max(r[k] for r in rows) - min(r[k] for r in rows)) / med(rows, k)  # noqa: E731
    out = {**first, "cross_check_rounds": rounds}
    for k in ("prefill_tps", "decode_tps"):
        out[k], out[f"llama_bench_{k}"] = med(ours, k), med(theirs, k)
        out[f"{k.removesuffix('_tps')}_vs_llama_bench"] = out[k] / out[f"llama_bench_{k}"] - 1
        # how much each tool disagrees with itself across the rounds: the noise floor of the comparison
        out[f"{k.removesuffix('_tps')}_spread_ours"], out[f"{k.removesuffix('_tps')}_spread_llama_bench"] = \
            spread(ours, k), spread(theirs, k)
    return out


def markdown(rows: list[dict]) -> str:
    """A table of `bench_files` rows (with llama-bench's figures where a row has them)."""
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| file | backend | target | predicted | prefill tok/s | decode tok/s | TTFT ms | peak RSS MB | size MB "
             "| roofline tok/s | share | llama-bench prefill | llama-bench decode |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['file']} | {r['backend']} | {r['target']} | {'yes' if r['predicted'] else 'no'} | "
                     f"{fmt(r.get('prefill_tps'), '.0f')} | {fmt(r['decode_tps'], '.1f')} | {fmt(r.get('ttft_ms'), '.0f')} | "
                     f"{fmt(r.get('peak_rss_mb'), '.0f')} | {fmt(r['size_mb'], '.1f')} | {fmt(r['roofline_tps'], '.0f')} | "
                     f"{fmt(r['roofline_share'], '.0%')} | {fmt(r.get('llama_bench_prefill_tps'), '.0f')} | "
                     f"{fmt(r.get('llama_bench_decode_tps'), '.1f')} |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], out: Path) -> list[Path]:
    """bench.json, bench.md and a decode-speed plot of the measured rows in `out`."""
    from edgekit.fsutil import write_json, write_text
    from edgekit.report.plots import decode_speed

    write_json(out / "bench.json", rows)
    write_text(out / "bench.md", markdown(rows))
    written = [out / "bench.json", out / "bench.md"]
    measured = [r for r in rows if not r["predicted"]]
    if measured:
        written.append(decode_speed(measured, out / "decode_speed.png"))
    return written
