"""Whole-pipeline tests of hidden on tiny models (moved from tests/unit/test_hidden.py, whose
fixtures they share): each runs `edgekit run` end to end."""

import json
import pytest

from tests.unit.test_hidden import rows  # noqa: F401  (fixtures and helpers)

pytestmark = pytest.mark.integration


def test_recipe_chooses_layers_by_importance_and_distills_hidden_states(tmp_path, tiny_teacher_dir):
    """Through `edgekit run`: keep_by: importance measures Block Influence on train rows and
    keeps as many layers as keep_every would; mlp_keep narrows their MLPs; hidden_states maps
    each to its source layer."""
    from edgekit.cli import main
    from tests.conftest import write_tiny_recipe

    recipe = write_tiny_recipe(tmp_path, tiny_teacher_dir)
    text = recipe.read_text().replace("keep_every: 2}", "keep_every: 2, keep_by: importance, importance_rows: 4, "
                                                         "mlp_keep: 0.5}")
    text = text.replace("warmup_steps: 1}", "warmup_steps: 1, hidden_states: {loss: mse, weight: 0.5}}")
    recipe.write_text(text.split("  - {type: export")[0])
    assert main(["run", str(recipe), "--runs-dir", str(tmp_path / "runs")]) == 0
    info = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["artifacts"]["distill"]["metrics"]
    scores, kept = info["block_importance"], info["kept_layers"]
    assert info["keep_by"] == "importance" and len(scores) == 4 and len(kept) == 3  # keep_every 2 of 4: 0, 2, 3
    assert kept == sorted(sorted(range(4), key=lambda i: -scores[i])[:3])
    assert info["hidden_states"]["layer_map"] == {str(i): t for i, t in enumerate(kept)}
    assert info["final"]["hidden"] > 0
    assert info["mlp"]["intermediate_size"] == [128, 64]  # and Minitron width pruning halved the MLPs
    saved = json.loads((tmp_path / "runs" / "tiny" / "stages" / "01-distill" / "model" / "config.json").read_text())
    assert saved["intermediate_size"] == 64 and saved["num_hidden_layers"] == 3

