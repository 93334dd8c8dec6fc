"""Sequence-level KD and on-policy KD on the real embedded SmolLM2-135M-Instruct: the teacher
answers real prompts (its chat template applied), the answers are filtered into the training
set, and the student trains on them with half its steps on its own samples."""

import json
from pathlib import Path

import pytest

from edgekit.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.embedded]  # embedded: uses the user's cache
REPO = Path(__file__).resolve().parents[2]


def test_sequence_and_on_policy_kd_on_smollm2(tmp_path):
    prompts = (REPO / "recipes" / "data" / "prompts.jsonl").read_text().splitlines()[:4]
    (tmp_path / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    (tmp_path / "docs.jsonl").write_text((REPO / "recipes" / "data" / "stdlib_docs.jsonl").read_text())
    recipe = tmp_path / "modes.yaml"
    recipe.write_text(
        "name: kd-modes\nseed: 0\nteacher: {model: embedded:smollm2-135m-instruct}\n"
        "student: {init: teacher_layers, keep_every: 6}\n"
        "data: {train: docs.jsonl, holdout_fraction: 0.1, seq_len: 96}\n"
        "stages:\n"
        "  - type: distill\n    steps: 4\n    batch_size: 2\n    lr: 1.0e-3\n    warmup_steps: 1\n"
        "    on_policy_fraction: 0.5\n"
        "    sequence_kd: {prompts: prompts.jsonl, max_new_tokens: 48, drop_truncated: false, batch_size: 4}\n")
    assert main(["run", str(recipe), "--runs-dir", str(tmp_path / "runs")]) == 0
    stage = next((tmp_path / "runs" / "kd-modes" / "stages").glob("*-distill"))
    stats = json.loads((stage / "sequence_kd_stats.json").read_text())
    assert stats["generated"] == 4 and stats["kept"] >= 2, stats
    answers = [json.loads(x)["response"] for x in (stage / "sequence_kd.jsonl").read_text().splitlines()]
    assert all(sum(c.isalpha() for c in a) > 20 for a in answers), answers  # real text from the real teacher
    art = json.loads((stage / "artifact.json").read_text())["metrics"]
    assert art["sequence_kd"]["token_level_kd_too"] is True  # same vocabulary: logit KD on the answers too
    steps = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 4 and all(0 < s["kd"] < 50 for s in steps), steps
    from edgekit.distill.trainer import KDSettings, is_on_policy

    st = KDSettings(seed=0, on_policy_fraction=0.5)
    assert [is_on_policy(st, step, 0) for step in range(4)] == [True, True, True, False]  # 3 steps on student samples
