"""Crash anywhere, resume, get the same artifacts: the tiny recipe is killed with SIGKILL
shortly after each stage starts (and once mid-training), rerun each time, and its final
artifacts must equal those of an uninterrupted run, with nothing half-written left behind."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def start(recipe: Path, runs: Path, *extra: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgekit.cli", "run", str(recipe), "--runs-dir", str(runs), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_killing_at(recipe: Path, runs: Path, stage: str, delay: float) -> bool:
    """Run from `stage` (`--from`: it runs even if a kill let it finish, resuming its own
    unfinished work), SIGKILL `delay` s after it starts. False if the run ended first."""
    proc = start(recipe, runs, "--from", stage.split("-", 1)[1])
    marker = f"[{stage}] running"
    for line in proc.stdout:
        if marker in line:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
    proc.wait()
    return False


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_sigkill_anywhere_then_resume_gives_identical_artifacts(tiny_recipe, tmp_path):
    # the quickstart's stages on tiny models: distill, qat (with its float twin), export, evaluate, bench, report
    text = tiny_recipe.read_text().replace("steps: 4, batch_size: 2", "steps: 6, batch_size: 2")
    tiny_recipe.write_text(text.replace(
        "  - {type: export, formats: [f16, q8_0, onnx_int4]}",
        "  - {type: qat, steps: 4, batch_size: 2, loss_chunk: 16, checkpoint_every: 2, lr: 1.0e-3}\n"
        "  - {type: export, formats: [f16, q4_k_m]}"))
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert subprocess.run([sys.executable, "-m", "edgekit.cli", "run", str(tiny_recipe), "--runs-dir", str(clean)],
                          cwd=REPO, capture_output=True).returncode == 0

    kills = 0
    points = [("01-distill", 0.0), ("01-distill", 1.5), ("01-distill", 3.0), ("02-qat", 1.0), ("02-qat", 2.5),
              ("03-export", 0.3), ("04-evaluate", 0.5), ("05-bench", 0.5), ("06-report", 0.2)]
    for stage, delay in points:
        kills += run_killing_at(tiny_recipe, crashed, stage, delay)
        # after every kill: no finished stage is half-written (artifact.json is written last)
        for art in (crashed / "tiny" / "stages").glob("*/artifact.json") if (crashed / "tiny").exists() else []:
            json.loads(art.read_text())
    assert kills == len(points)
    final = start(tiny_recipe, crashed)
    out = final.communicate()[0]
    assert final.returncode == 0, out[-2000:]

    a, b = clean / "tiny", crashed / "tiny"
    assert not list(b.glob("stages/*.partial")), "a work directory was left behind"
    for f in sorted((a / "export").iterdir()):
        assert digest(b / "export" / f.name) == digest(f), f.name
    for stage in ("01-distill", "02-qat"):
        assert digest(b / "stages" / stage / "model") == digest(a / "stages" / stage / "model")
    ma = json.loads((a / "manifest.json").read_text())["artifacts"]
    mb = json.loads((b / "manifest.json").read_text())["artifacts"]
    assert ma["evaluate"]["metrics"] == mb["evaluate"]["metrics"]
    for path in b.rglob("*.json"):  # nothing truncated
        json.loads(path.read_text())
