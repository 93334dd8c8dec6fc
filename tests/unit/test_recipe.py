"""The recipe schema: every shipped recipe validates; every mistake is named with its path."""

from pathlib import Path

import pytest

from edgekit.cli import main
from edgekit.errors import EdgekitError, RecipeError
from edgekit.stages import load_recipe
from edgekit.recipe.load import apply_override

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_there_are_shipped_recipes():
    assert any(p.name == "quickstart.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe, base = load_recipe(path)
    assert recipe.stages and base == path.parent.resolve()


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n{"text": "d e f"}\n')
    return p


GOOD = """
name: t
teacher: {model: embedded:smollm2-135m-instruct}
data: {train: d.jsonl}
stages:
  - {type: distill, steps: 2}
  - {type: export}
"""


def problems(tmp_path, text: str, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text), list(overrides))
    return e.value.problems


def test_good_recipe(tmp_path):
    recipe, _ = load_recipe(write(tmp_path, GOOD))
    assert recipe.stages[0].steps == 2 and recipe.stages[1].formats == ["f16", "q4_k_m"]


def test_all_problems_listed_at_once_with_paths_and_suggestions(tmp_path):
    bad = GOOD.replace("{type: distill, steps: 2}", "{type: distill, steps: two, los: forward_kl}") \
              .replace("{type: export}", "{type: export, formats: [q4km]}")
    got = problems(tmp_path, bad)
    assert any(p.startswith("stages[0].steps:") for p in got)
    assert any("stages[0]: unknown key 'los'; did you mean 'loss'?" in p for p in got)
    assert any("stages[1].formats[0]: 'q4km' is not one of" in p and "did you mean 'q4_k_m'?" in p for p in got)
    assert len(got) == 3


def test_unknown_stage_type_and_order(tmp_path):
    got = problems(tmp_path, GOOD.replace("type: export", "type: exprot"))
    assert any("unknown stage type 'exprot'; did you mean 'export'?" in p for p in got)
    swapped = GOOD.replace("  - {type: distill, steps: 2}\n  - {type: export}\n", "  - {type: export}\n  - {type: distill}\n")
    assert any("must follow" in p for p in problems(tmp_path, swapped))


def test_consumers_need_producers(tmp_path):
    text = GOOD.replace("  - {type: export}\n", "  - {type: evaluate}\n")
    assert any("needs an 'export' stage" in p for p in problems(tmp_path, text))


def test_missing_files_and_unknown_models(tmp_path):
    got = problems(tmp_path, GOOD.replace("d.jsonl", "nope.jsonl").replace("smollm2-135m-instruct", "smollm3"))
    assert any(p.startswith("data.train: file 'nope.jsonl' does not exist") for p in got)
    assert any("unknown embedded model 'smollm3'" in p and "did you mean 'smollm2-135m-instruct'" in p for p in got)
    got = problems(tmp_path, GOOD.replace("embedded:smollm2-135m-instruct", "./no/such/dir"))
    assert any(p.startswith("teacher.model:") and "neither an existing path" in p for p in got)


def test_overrides(tmp_path):
    recipe, _ = load_recipe(write(tmp_path, GOOD), ["stages.distill.steps=7", "stages[1].formats=[f16]", "data.seq_len=64"])
    assert recipe.stages[0].steps == 7 and recipe.stages[1].formats == ["f16"] and recipe.data.seq_len == 64
    with pytest.raises(EdgekitError, match="no stage of type 'distil'; did you mean 'distill'"):
        apply_override({"stages": [{"type": "distill"}]}, "stages.distil.steps=3")
    with pytest.raises(EdgekitError, match="has no '='"):
        apply_override({}, "steps")


def test_yaml_errors_and_non_mappings(tmp_path):
    with pytest.raises(EdgekitError, match="not valid YAML.*line"):
        load_recipe(write(tmp_path, "name: [unclosed"))
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(EdgekitError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    text = "name: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(EdgekitError, match="not valid YAML"):
        load_recipe(write(tmp_path, text))


def test_cli_exit_code_2_and_no_traceback(tmp_path, capsys):
    p = write(tmp_path, GOOD.replace("steps: 2", "stepz: 2"))
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'stepz'; did you mean 'steps'?" in err and "Traceback" not in err
    assert main(["validate", str(write(tmp_path, GOOD))]) == 0


def test_bad_recipe_writes_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "t").mkdir(parents=True)
    (runs / "t" / "keep.txt").write_text("finished")
    p = write(tmp_path, GOOD.replace("steps: 2", "steps: -1"))
    assert main(["run", str(p), "--runs-dir", str(runs)]) == 2
    assert [f.name for f in (runs / "t").iterdir()] == ["keep.txt"]
    assert (runs / "t" / "keep.txt").read_text() == "finished"
