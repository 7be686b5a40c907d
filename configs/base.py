"""The base every recipe derives from: `core.recipe.Recipe`'s defaults plus a size.

The defaults in `Recipe` are deliberately plain (SGD lr 0.1, momentum 0.9, batch 128, 200 epochs,
crop 32 pad 4 with flips, fast in-memory pipeline); a recipe states every number it relies on
anyway,
so that reading one file tells the whole recipe.
"""

from core.recipe import Recipe, make_recipe


def base(size: str = "full", **fields) -> Recipe:
    """A validated recipe from the base defaults and `fields`; size="smoke" shrinks any recipe."""
    return make_recipe(size=size, **fields)
