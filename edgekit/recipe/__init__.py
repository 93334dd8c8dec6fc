"""The recipe: its shared typed schema (schema.py) and its loading (load.py). The whole
recipe's schema, with every stage's config, is `edgekit.stages.Recipe`; load a recipe with
`edgekit.stages.load_recipe`."""
