"""Our KL statistics against llama.cpp's own `llama-perplexity --kl-divergence`, same files and text.

    bash third_party/build_llama_tools.sh                  # llama-perplexity (once)
    .venv/bin/python benchmarks/qat_general.py smollm2-135m  # makes the files (runs/qat-smollm2)
    .venv/bin/python benchmarks/kld_crosscheck.py

For each quantized file of the SmolLM2 run, on each general subset (the first 4 chunks of 256
tokens): the F16 file's logits (x86 llama.cpp through llama-cpp-python) are written as
llama-perplexity's base file (edgekit.bench.kld); llama-perplexity (x86, built from the same
llama.cpp) computes the quantized file's KL statistics against it, and edgekit computes them from
the same base file with the quantized file's logits from llama-cpp-python. Results:
benchmarks/results/kld_crosscheck.json (both sides, per file and subset).
"""

import subprocess
import tempfile
from pathlib import Path

import numpy as np
from common import REPO, write_result

from edgekit.machine import machine_description

CTX, CHUNKS = 256, 4


def main() -> dict:
    import torch

    from edgekit.bench import kld
    from edgekit.bench.llama_bench import llama_bench_bin
    from edgekit.bench.llama_runner import bos_to_prepend, llama_scorer, load_llama, no_repack_args

    run = REPO / "runs" / "qat-smollm2" / "qat_general"
    f16 = next((REPO / "runs" / "qat-smollm2" / "stages").glob("*-export/*ptq-F16.gguf"))  # the untouched model's F16
    files = {p.stem.split("-")[-1] if "imatrix" not in p.stem else "Q4_K_M-imatrix": p for p in sorted(run.glob("*.gguf"))}
    files["QAT-Q4_K_M"] = next((REPO / "runs" / "qat-smollm2" / "export").glob("qat-smollm2-student-Q4_K_M.gguf"))
    exe = llama_bench_bin().parent / "llama-perplexity"
    llm = load_llama(f16, n_ctx=16)
    bos = bos_to_prepend(llm)
    encode = lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)  # noqa: E731
    ref = llama_scorer(f16, CTX)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for sub in sorted((REPO / "recipes" / "data" / "general").glob("*.jsonl")):
            import json

            text = "\n\n".join(json.loads(line)["text"] for line in sub.read_text().splitlines())
            tokens = kld.chunks(encode(text), CTX, CHUNKS)
            base = Path(tmp) / f"{sub.stem}.kld"
            kld.write_logits_file(base, tokens, llm.n_vocab(), bos, lambda ids: ref(torch.from_numpy(ids.astype(np.int64))).numpy())
            for name, path in files.items():
                cand = llama_scorer(path, CTX)
                ours = kld.compare_to_file(base, lambda ids: cand(torch.from_numpy(ids.astype(np.int64))).numpy(), bos)
                cmd = [str(exe), "-m", str(path), "--kl-divergence-base", str(base), "--kl-divergence", "-c", str(CTX),
                       "-b", str(CTX), "-t", "2", *no_repack_args()]
                res = subprocess.run(cmd, capture_output=True, text=True)
                theirs = kld.parse_llama_perplexity(res.stdout + res.stderr) if res.returncode == 0 else {"error": res.returncode}
                out.setdefault(sub.stem, {})[name] = {"edgekit": ours, "llama_perplexity": theirs}
    result = {"ctx": CTX, "chunks": CHUNKS, "reference": f16.name, "subsets": out, "machine": machine_description()}
    write_result("kld_crosscheck.json", result)
    return result


if __name__ == "__main__":
    main()
