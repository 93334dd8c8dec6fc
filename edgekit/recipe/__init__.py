from edgekit.recipe.load import load_recipe
from edgekit.recipe.schema import Recipe

__all__ = ["load_recipe", "Recipe"]
