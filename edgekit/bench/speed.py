"""Speed and memory of one model file, measured in a fresh child process.

A child process per measurement gives an honest peak resident memory (ru_maxrss of
that process alone) and keeps one model's allocations from skewing the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgekit.errors import EdgekitError


def measure(path: Path, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "edgekit.bench.worker", str(path), str(threads), str(prompt_tokens),
           str(gen_tokens), str(repeats)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        raise EdgekitError(f"benchmark of {path.name} failed: {last}", "run `edgekit inspect` on the file to check it")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = result.pop("_peak_rss_kb") / 1024
    result["size_mb"] = model_size(path) / 2**20
    return result


def model_size(path: Path) -> int:
    """Bytes of a file, or of every file in a model folder."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
