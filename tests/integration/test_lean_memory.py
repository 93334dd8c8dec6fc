"""The memory estimate `edgekit validate` prints, against the measured peak of real KD steps
on the quickstart pair (SmolLM2-135M teacher in NF4, its 11-layer student, 8-bit AdamW)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.embedded]  # embedded: uses the user's cache


@pytest.mark.parametrize("load,optimizer,batch", [("nf4", "adamw8bit", 2), ("fp32", "adamw", 4)])
def test_estimate_within_25_percent_of_measured_peak(load, optimizer, batch):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lean_kd.py"), "--worker", load, optimizer,
                          "--steps", "3", "--batch", str(batch), "--seq-len", "128"],
                         cwd=REPO, capture_output=True, text=True, check=True, timeout=900)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(r["estimate_mb"] - r["peak_mem_mb"]) <= 0.25 * r["peak_mem_mb"], r
