"""Whole-pipeline tests of parallel on tiny models (moved from tests/unit/test_parallel.py, whose
fixtures they share): each runs `edgekit run` end to end."""

import json
import subprocess
import sys
import pytest
from tests.conftest import REPO

from tests.unit.test_parallel import run  # noqa: F401  (fixtures and helpers)

pytestmark = pytest.mark.integration


def test_edgekit_run_under_torchrun(tiny_recipe, tmp_path):
    """`edgekit run` with 2 processes, replicated and FSDP-sharded: rank 0 keeps the books,
    both train; the result is the single-process result (up to float summation order).
    Sharded, rank 1 loads no model (meta-device skeletons filled from rank 0's values), the
    student is gathered into one model file, and the stages after training see a whole
    teacher again. Rank 1 leaves nothing behind."""
    text = tiny_recipe.read_text().replace("[f16, q8_0, onnx_int4]", "[f16]")
    text = text.replace("  - {type: bench, prompt_tokens: 8, gen_tokens: 4, repeats: 1}\n", "")
    # fp32: equal up to summation order (under bf16 autocast, auto's choice on a Zen 4, a different order flips roundings)
    text = text.replace("warmup_steps: 1}", "warmup_steps: 1, precision: fp32}")
    sharded = text.replace("precision: fp32}", "precision: fp32, parallel: {student: sharded, teacher: sharded}}")
    assert sharded != text
    results = {}
    for name, nproc, recipe_text in (("one", 1, text), ("two", 2, text), ("two_sharded", 2, sharded)):
        tiny_recipe.write_text(recipe_text)
        runs = tmp_path / name
        launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        proc = subprocess.run([sys.executable, *launcher, "-m" if nproc == 1 else str(REPO / "edgekit" / "cli.py"),
                               *(["edgekit.cli"] if nproc == 1 else []), "run", str(tiny_recipe), "--runs-dir", str(runs)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((runs / "tiny" / "manifest.json").read_text())["artifacts"]
        assert not (runs / "tiny" / ".ranks").exists() or not any((runs / "tiny" / ".ranks").iterdir())
    one = results["one"]
    for name in ("two", "two_sharded"):
        got = results[name]
        assert got["distill"]["metrics"]["final"]["loss"] == pytest.approx(one["distill"]["metrics"]["final"]["loss"], rel=1e-4)
        assert got["evaluate"]["metrics"]["gguf_f16"]["ppl"] == pytest.approx(one["evaluate"]["metrics"]["gguf_f16"]["ppl"],
                                                                              rel=1e-3)
        assert ("other_processes_loaded" in got["distill"]["metrics"]) == (name == "two_sharded")
        # the whole teacher again after training (evaluated at its own perplexity, not a shard's)
        assert got["evaluate"]["metrics"]["teacher"]["ppl"] == pytest.approx(one["evaluate"]["metrics"]["teacher"]["ppl"],
                                                                             rel=1e-5)

