"""Load a recipe: YAML (safe) -> key=value overrides -> schema -> file and model checks.

Every problem is collected and raised once as a `RecipeError`, each with its YAML path:

    stages[1].formats[0]: 'q4km' is not one of ['f32', 'f16', 'q8_0', 'q4_0', 'q4_k_m']; did you mean 'q4_k_m'?
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from edgekit.bounded import MAX_YAML_BYTES, cut, load_yaml, read_text
from edgekit.errors import EdgekitError, RecipeError, did_you_mean
from edgekit.recipe.schema import DataSpec, ModelSpec, RecipeBase, StudentSpec


def load_recipe(path: str | Path, overrides: list[str], model: type[RecipeBase]) -> tuple[RecipeBase, Path]:
    """Return the validated recipe and the directory its relative paths are resolved from.
    `model` is the whole recipe's schema (edgekit.stages.Recipe, built from the stage registry)."""
    path = Path(path)
    if path.is_dir():
        raise EdgekitError(f"{path} is a directory, not a recipe", "pass a .yaml file, e.g. recipes/quickstart.yaml")
    if not path.is_file():
        raise EdgekitError(f"recipe {path} does not exist", "check the path; shipped recipes are in recipes/")
    try:
        raw = load_yaml(read_text(path, MAX_YAML_BYTES, "recipe"), str(path))
    except yaml.YAMLError as e:
        raise EdgekitError(f"{path} is not valid YAML: {cut(str(e).splitlines()[0])} ({_yaml_where(e)})",
                           "fix the YAML syntax at that line") from None
    if not isinstance(raw, dict):
        raise RecipeError(str(path), ["the recipe must be a mapping of keys (name, teacher, data, stages, ...)"])
    for ov in overrides:
        apply_override(raw, ov)
    return validate(raw, str(path), path.parent.resolve(), model), path.parent.resolve()


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"


def validate(raw: dict, source: str, base: Path, model: type[RecipeBase]) -> RecipeBase:
    recipe, problems = None, []
    try:
        recipe = model.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err, model) for err in e.errors()]
    problems += check_files_and_models(raw, base)
    if problems:
        raise RecipeError(source, sorted(set(problems), key=problems.index))
    return recipe


def _get(raw: dict, *keys):
    for k in keys:
        raw = raw.get(k) if isinstance(raw, dict) else None
    return raw if isinstance(raw, str) else None


def check_files_and_models(raw: dict, base: Path) -> list[str]:
    """Checks that need the filesystem but no model load (run even when the schema fails,
    so one `validate` lists every problem)."""
    from edgekit.models.sources import describe_source_problem

    problems = []
    for where, spec in (("teacher.model", _get(raw, "teacher", "model")), ("student.model", _get(raw, "student", "model"))):
        if spec:
            msg = describe_source_problem(spec, base)
            if msg:
                problems.append(f"{where}: {msg}")
    for where, p in (("data.train", _get(raw, "data", "train")), ("data.holdout", _get(raw, "data", "holdout"))):
        if p and not p.startswith("hf:"):
            f = (base / p)
            if not f.exists():
                problems.append(f"{where}: file '{p}' does not exist (resolved to {f}); paths are relative to the recipe file")
            elif f.is_dir():
                problems.append(f"{where}: '{p}' is a directory; name a .jsonl or .txt file")
    for i, st in enumerate(raw.get("stages") or []):
        prompts = _get(st, "sequence_kd", "prompts") if isinstance(st, dict) else None
        if prompts and not (base / prompts).is_file():
            problems.append(f"stages[{i}].sequence_kd.prompts: file '{prompts}' does not exist (resolved to {base / prompts})")
        tasks = st.get("tasks") if isinstance(st, dict) and st.get("type") == "evaluate" else None
        if isinstance(tasks, str) and not (base / tasks).is_file():
            problems.append(f"stages[{i}].tasks: file '{tasks}' does not exist (resolved to {base / tasks}); "
                            "paths are relative to the recipe file")
    keep = (raw.get("student") or {}).get("keep_layers") if isinstance(raw.get("student"), dict) else None
    if isinstance(keep, list) and keep and all(isinstance(i, int) for i in keep):
        if sorted(set(keep)) != keep or min(keep) < 0:
            problems.append("student.keep_layers: list distinct, increasing, non-negative teacher layer indices")
    return problems


def _loc(loc: tuple, stage_types) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in stage_types or part in ("function-after",):
            continue  # pydantic puts the union tag in the path; the user never wrote it
        else:
            out += f".{part}" if out else str(part)
    return out or "(recipe)"


def _describe(err: dict, model: type[RecipeBase]) -> str:
    loc, kind, msg = err["loc"], err["type"], err["msg"]
    stages = model.STAGE_CONFIGS
    where = _loc(loc, stages)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc, model)
        return f"{_loc(loc[:-1], stages)}: unknown key '{cut(str(loc[-1]), 64)}'{did_you_mean(cut(str(loc[-1]), 64), allowed)} (allowed: {', '.join(allowed)})"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind in ("literal_error", "enum"):
        choices = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        return f"{where}: {cut(repr(err['input']))} is not one of {choices}{did_you_mean(cut(str(err['input']), 64), choices)}"
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag", "?")
        return f"{where}.type: unknown stage type '{cut(str(tag), 64)}'{did_you_mean(str(tag)[:64], list(stages))} (known: {', '.join(stages)})"
    if kind == "union_tag_not_found":
        return f"{where}: a stage needs a 'type' (one of {', '.join(stages)})"
    if kind == "value_error":
        return f"{where}: {cut(msg.removeprefix('Value error, '), 600)}"
    return f"{where}: {cut(msg, 300)} (got {cut(repr(err.get('input')))})"


def _allowed_keys(loc: tuple, model: type[RecipeBase]) -> list[str]:
    top = {"teacher": ModelSpec, "student": StudentSpec, "data": DataSpec}
    if len(loc) == 1:
        return list(model.model_fields)
    if loc[0] in top:
        return list(top[loc[0]].model_fields)
    if loc[0] == "stages" and len(loc) >= 3 and loc[2] in model.STAGE_CONFIGS:
        return list(model.STAGE_CONFIGS[loc[2]].model_fields)
    return []


def apply_override(raw: dict, override: str) -> None:
    """Apply `a.b[0].c=value` (value parsed as YAML). `stages.distill.steps=5` picks a stage by type."""
    if "=" not in override:
        raise EdgekitError(f"override '{cut(override, 80)}' has no '='", "write overrides as key.path=value, e.g. stages.distill.steps=5")
    key, value = override.split("=", 1)
    try:
        parsed = load_yaml(value, f"override '{cut(key, 60)}'") if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    parts = [p for p in re.split(r"\.|\[(\d+)\]", key) if p]
    node = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, key)
            if last:
                node[idx] = parsed
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = parsed
            else:
                node = node.setdefault(part, {})
        else:
            raise EdgekitError(f"override '{cut(key, 80)}': '{parts[i - 1]}' is a value, not a mapping or list",
                               "check the key path against the recipe")


def _list_index(node: list, part: str, key: str) -> int:
    if part.isdigit():
        if int(part) >= len(node):
            raise EdgekitError(f"override '{cut(key, 80)}': index {part} is past the end (the list has {len(node)} items)",
                               "use an index that exists")
        return int(part)
    matches = [i for i, item in enumerate(node) if isinstance(item, dict) and item.get("type") == part]
    if not matches:
        types = [item.get("type") for item in node if isinstance(item, dict)]
        raise EdgekitError(f"override '{cut(key, 80)}': no stage of type '{cut(part, 64)}'{did_you_mean(part[:64], types)}",
                           f"stages in this recipe: {types}")
    return matches[0]
