"""Cross-check against llama.cpp's own `llama-bench` (built by third_party/build_llama_tools.sh)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def llama_bench_bin() -> Path | None:
    from edgekit.models.sources import cache_dir

    import importlib.metadata as md

    base = os.environ.get("EDGEKIT_LLAMA_TOOLS") or cache_dir() / f"llama-tools-{md.version('llama-cpp-python')}"
    exe = Path(base) / "bin" / "llama-bench"
    return exe if exe.is_file() else None


def llama_bench(path: Path, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int = 3) -> dict | None:
    """{"prefill_tps", "decode_tps"} from llama-bench, or None when it is not built."""
    exe = llama_bench_bin()
    if exe is None:
        return None
    out = subprocess.run([str(exe), "-m", str(path), "-t", str(threads), "-p", str(prompt_tokens), "-n",
                          str(gen_tokens), "-r", str(repeats), "-o", "json"], capture_output=True, text=True, check=True)
    result = {}
    for test in json.loads(out.stdout):
        if test.get("n_gen", 0) == 0:
            result["prefill_tps"] = test["avg_ts"]
        elif test.get("n_prompt", 0) == 0:
            result["decode_tps"] = test["avg_ts"]
    return result
