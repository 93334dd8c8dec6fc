"""Child process for `speed.measure`: python -m edgekit.bench.worker FILE|ONNX_DIR THREADS PROMPT GEN REPEATS"""

import json
import resource
import sys
from pathlib import Path

from edgekit.bench.llama_runner import llama_speed
from edgekit.errors import EdgekitError


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over
    exec from the parent, so a child of a big process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    path, threads, prompt, gen, repeats = sys.argv[1], *map(int, sys.argv[2:6])
    try:
        if Path(path).is_dir():
            from edgekit.bench.ort_runner import ort_speed

            result = ort_speed(Path(path), prompt, gen, threads, repeats)
        else:
            result = llama_speed(Path(path), prompt, gen, threads, repeats)
    except EdgekitError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)
    result["_peak_rss_kb"] = peak_rss_kb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
