"""A draft for speculative decoding, end to end on tiny models: distilled from the target,
exported beside it (draft.json), loaded as a pair by edgekit.runtime, same greedy text."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_a_distilled_draft_ships_with_its_target_and_runs_as_a_pair(tiny_teacher_dir, tmp_path):
    from edgekit import runtime
    from tests.conftest import run_teacher_recipe

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["The module", "A list", "Files"]))
    run, art = run_teacher_recipe(tmp_path, "draft", tiny_teacher_dir, """\
  - {type: distill, steps: 3, batch_size: 2, warmup_steps: 1, sequence_kd: {prompts: prompts.jsonl, max_new_tokens: 16, temperature: 0.0, drop_truncated: false}}
  - {type: export, formats: [q8_0], draft_target: f16}
""", docs=20)
    pair = json.loads((run / "export" / "draft.json").read_text())
    assert pair == {"target": "draft-target-F16.gguf", "draft": "draft-student-Q8_0.gguf", "draft_tokens": 4}
    readme = (run / "export" / "README.md").read_text()
    assert "llama-server -m draft-target-F16.gguf -md draft-student-Q8_0.gguf" in readme
    both = runtime.load(run / "export", n_ctx=256)
    assert both.path.name == pair["target"] and both.draft is not None
    alone = runtime.load(run / "export" / pair["target"], n_ctx=256)
    assert both.generate("The module", max_tokens=32) == alone.generate("The module", max_tokens=32)
    assert both.draft.proposed > 0
