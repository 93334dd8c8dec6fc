"""Whole-pipeline tests of sequence_kd on tiny models (moved from tests/unit/test_sequence_kd.py, whose
fixtures they share): each runs `edgekit run` end to end."""

import json
from edgekit.cli import main


import pytest

pytestmark = pytest.mark.integration


def test_sequence_kd_recipe(tiny_recipe, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question number {i}: what is {i} plus {i}?"}) + "\n" for i in range(6)))
    text = tiny_recipe.read_text().replace(
        "  - {type: distill, steps: 4, batch_size: 2, loss_chunk: 16, checkpoint_every: 2, warmup_steps: 1}",
        "  - type: distill\n    steps: 2\n    batch_size: 2\n    sequence_kd: {prompts: prompts.jsonl, max_new_tokens: 24, "
        "drop_truncated: false, batch_size: 3}")
    tiny_recipe.write_text(text.split("  - {type: export")[0] + "  - {type: export, formats: [f16]}\n")
    assert main(["run", str(tiny_recipe), "--runs-dir", str(tmp_path / "runs")]) == 0
    stage = next((tmp_path / "runs" / "tiny" / "stages").glob("*-distill"))
    stats = json.loads((stage / "sequence_kd_stats.json").read_text())
    assert stats["generated"] == 6 and stats["kept"] >= 1 and stats["sampling"]["max_new_tokens"] == 24
    rows = [json.loads(x) for x in (stage / "sequence_kd.jsonl").read_text().splitlines()]
    assert all(r["response"] for r in rows)
    art = json.loads((stage / "artifact.json").read_text())
    assert art["metrics"]["sequence_kd"]["token_level_kd_too"] is True

