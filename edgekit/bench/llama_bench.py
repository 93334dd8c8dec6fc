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


def llama_bench(path: Path, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int = 5) -> dict | None:
    """{"prefill_tps", "decode_tps"} from llama-bench, or None when it is not built.

    Settings match what `llama_speed` measures through llama-cpp-python: flash attention off
    (llama-cpp-python's default; llama-bench's is "auto", ~7% faster prefill here), prefill from
    an empty context, and decode at a depth of `prompt_tokens` (after the prompt, as ours is).
    """
    common = _command(path, threads, repeats)
    if common is None:
        return None
    result = {}
    for key, args in (("prefill_tps", ["-p", str(prompt_tokens), "-n", "0"]),
                      ("decode_tps", ["-p", "0", "-n", str(gen_tokens), "-d", str(prompt_tokens)])):
        out = subprocess.run(common + args, capture_output=True, text=True, check=True)
        result[key] = json.loads(out.stdout)[0]["avg_ts"]
    return result


def batch_speeds(path: Path, threads: int, batches: list[int], depth: int, repeats: int = 20) -> dict[int, float] | None:
    """Tokens/s of one forward pass over k new tokens at `depth` tokens of context, for each k in
    `batches` (k = n + 1 is what verifying n drafted tokens costs), and under key 1 the decode
    speed (32 decode steps, each one token), or None when llama-bench is not built."""
    common = _command(path, threads, repeats)
    if common is None:
        return None
    ks = [k for k in batches if k > 1]
    runs = [["-p", "0", "-n", "32"]] + ([["-p", ",".join(map(str, ks)), "-n", "0"]] if ks else [])
    speeds = {}
    for args in runs:
        out = subprocess.run(common + args + ["-d", str(depth)], capture_output=True, text=True, check=True)
        speeds |= {row["n_prompt"] or 1: row["avg_ts"] for row in json.loads(out.stdout)}
    return speeds


def _command(path: Path, threads: int, repeats: int) -> list[str] | None:
    from edgekit.bench.llama_runner import cpu_has_amx

    exe = llama_bench_bin()
    if exe is None:
        return None
    common = [str(exe), "-m", str(path), "-t", str(threads), "-r", str(repeats), "-fa", "0", "-o", "json"]
    if cpu_has_amx():  # llama.cpp's AMX repacking dies here (SIGILL in llama-bench, as our loads segfault)
        common += ["--repack", "0"]
    return common
