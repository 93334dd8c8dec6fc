"""Stage types, one module each, and the recipe schema built from them.

Importing this package registers every stage (the order below is the order they run in a
recipe) and builds `Recipe`, whose `stages` list accepts any registered stage config.
Stage modules import only light things at the top (pydantic, the config pieces); torch and
the heavy libraries load inside their run functions, so `edgekit validate` stays fast.

Adding a stage: a new module here with its config (a `recipe.schema.StageConfig`), its run
function under `@register`, and its outputs dataclass in `stages/outputs.py` if later
stages read them; then one import line below.
"""

from edgekit.recipe.load import load_recipe as _load
from edgekit.recipe.schema import recipe_model
from edgekit.stages.registry import REGISTRY, StageResult, StageType, register

from edgekit.stages import distill, qat, ptq, export, evaluate, bench, report  # noqa: E402,F401  (registers, in run order)

Recipe = recipe_model({name: s.config for name, s in REGISTRY.items()},
                      {name: s.requires for name, s in REGISTRY.items()})


def load_recipe(path, overrides=()):
    """(validated recipe, the directory its relative paths start from)."""
    return _load(path, overrides, Recipe)


def training_stages() -> tuple[str, ...]:
    """The stage types every process of a torchrun job takes part in."""
    return tuple(name for name, s in REGISTRY.items() if s.trains)


__all__ = ["REGISTRY", "Recipe", "StageResult", "StageType", "load_recipe", "register", "training_stages"]
