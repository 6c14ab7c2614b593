"""recast: turn pretrained dense transformers into Mixture-of-Experts models.

    import recast
    result = recast.convert("recipes/quickstart.yaml")     # recipe path, dict or Recipe
    moe = recast.refactor(model, calibration="builtin:pydoc", experts=8, top_k=2, shared=0.25)
    recast.save(moe, "out/"); recast.load("out/")

Importing recast registers the `recast_moe` model type with transformers' Auto classes.
"""

from .api import refactor
from .errors import RecastError
from .models.hf import load, register_auto_classes, save
from .pipeline import ConversionResult, convert
from .recipe import Recipe, load_recipe

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "ConversionResult",
    "RecastError",
    "Recipe",
    "convert",
    "load",
    "load_recipe",
    "refactor",
    "save",
]
