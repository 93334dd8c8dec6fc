"""Whole-pipeline tests of lean on tiny models (moved from tests/unit/test_lean.py, whose
fixtures they share): each runs `edgekit run` end to end."""

import json
import pytest
from safetensors import safe_open
from edgekit.cli import main


pytestmark = pytest.mark.integration


def test_lean_recipe_end_to_end(tiny_recipe, tmp_path, capsys):
    """NF4 teacher + 8-bit AdamW + LoRA student: trains, merges, exports a plain model."""
    text = tiny_recipe.read_text()
    text = text.replace("teacher: {model: ", "teacher: {load: nf4, model: ")
    text = text.replace("checkpoint_every: 2, warmup_steps: 1}",
                        "checkpoint_every: 2, warmup_steps: 1, optimizer: adamw8bit, lr: 5.0e-3,"
                        " lora: {r: 4, alpha: 8, targets: [q_proj, v_proj, down_proj]}}")
    text = text.replace("[f16, q8_0, onnx_int4]", "[f16]").replace("  - {type: bench, prompt_tokens: 8, gen_tokens: 4, repeats: 1}\n", "")
    tiny_recipe.write_text(text)
    assert main(["validate", str(tiny_recipe)]) == 0
    assert "distill: expected peak memory" in capsys.readouterr().out
    assert main(["run", str(tiny_recipe), "--runs-dir", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "tiny" / "manifest.json").read_text())["artifacts"]
    d = m["distill"]["metrics"]
    assert 0 < d["trainable_params"] < d["student_params"] / 5
    model_dir = next((tmp_path / "tiny" / "stages").glob("*-distill")) / "model"
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "lora" in k or "base_layer" in k]  # adapters merged away
    ev = m["evaluate"]["metrics"]
    assert "teacher_nf4" in ev  # the teacher the student learned from, next to the real one

