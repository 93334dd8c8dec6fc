"""Shared by the benchmark scripts: run a shipped recipe, write a results file."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_recipe(recipe: str, name: str, *overrides: str) -> dict:
    """Run recipes/<recipe> as runs/<name> (finished stages are reused); its manifest's artifacts."""
    from edgekit.cli import main

    runs = REPO / "runs"
    if main(["run", str(REPO / "recipes" / recipe), "--runs-dir", str(runs), f"name={name}", *overrides, *sys.argv[1:]]):
        sys.exit(2)
    return json.loads((runs / name / "manifest.json").read_text())["artifacts"]


def write_result(file_name: str, result) -> None:
    out = REPO / "benchmarks" / "results" / file_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def rss_mb() -> float:
    """This process's resident memory (Linux /proc), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
