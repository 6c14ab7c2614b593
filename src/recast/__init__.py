"""recast: turn pretrained dense transformers into Mixture-of-Experts models.

    import recast
    result = recast.convert("recipes/quickstart.yaml")     # recipe path, dict or Recipe
    moe = recast.refactor(model, calibration="builtin:pydoc", experts=8, top_k=2, shared=0.25)
    recast.save(moe, "out/"); recast.load("out/")
    recast.export(moe, "exported/moe-onnx")                # a bundle with a parity record
    recast.runtime.load("exported/moe-onnx").generate("def f(")
    recast.fuse({"a": "a.onnx", "b": "exported/b-onnx"}, out="exported/ab")  # one DAG

Importing recast registers the `recast_moe` model type with transformers' Auto classes. Where
torch is not installed (a serving machine), only `recast.runtime` is available.
"""

import importlib.util

from .errors import RecastError

__version__ = "0.1.0"

if importlib.util.find_spec("torch") is not None:
    from .api import refactor
    from .export import export
    from .fusion import fuse
    from .models.hf import load, register_auto_classes, save
    from .pipeline import ConversionResult, convert
    from .recipe import Recipe, load_recipe

    register_auto_classes()

__all__ = [
    "ConversionResult",
    "RecastError",
    "Recipe",
    "convert",
    "export",
    "fuse",
    "load",
    "load_recipe",
    "refactor",
    "save",
]
