"""recast: turn pretrained dense transformers into Mixture-of-Experts models.

    import recast
    result = recast.convert("recipes/quickstart.yaml")     # recipe path, dict or Recipe
    moe = recast.refactor(model, calibration="builtin:pydoc", experts=8, top_k=2, shared=0.25)
    recast.save(moe, "out/"); recast.load("out/")
    recast.export(moe, "exported/moe-onnx")                # a bundle with a parity record
    recast.export_gguf("exported/moe-mixtral", "moe.gguf")  # a GGUF file llama.cpp ran
    recast.runtime.load("exported/moe-onnx").generate("def f(")
    recast.fuse({"a": "a.onnx", "b": "exported/b-onnx"}, out="exported/ab")  # one DAG

Importing recast is light: each public name imports its module on first use, so `recast
--help` and a serving process (`recast.runtime`: numpy, onnxruntime and tokenizers only) load
no torch. The `recast_moe` model type is registered with transformers' Auto classes as soon as
transformers is imported, before or after recast.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

from .errors import RecastError
from .version import __version__

# public name -> the module that defines it
PUBLIC = {
    "ConversionResult": "pipeline",
    "convert": "pipeline",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "refactor": "api",
    "export": "export",
    "export_gguf": "export.llama_cpp",
    "fuse": "fusion",
    "load": "formats.recast",
    "save": "formats.recast",
    "register_auto_classes": "formats.recast",
}
# The module that registers `recast_moe` with transformers when it is imported.
AUTO_CLASSES = f"{__name__}.formats.recast"


class _Package(types.ModuleType):
    """recast's own module type. The public names are properties of the class rather than
    attributes of the module because two of them are also subpackages (`recast.export`,
    `recast.refactor`): importing a subpackage sets the attribute of that name to it, which
    would shadow the function; a property ignores that."""


def _public(name: str, module: str) -> property:
    def resolve(package):
        try:
            defining = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:  # a serving machine: no torch, only recast.runtime
            if exc.name is None or exc.name.split(".")[0] == __name__:
                raise
            raise AttributeError(f"recast.{name} needs {exc.name}, which is not installed") from exc
        return getattr(defining, name)

    return property(resolve, lambda package, value: None)


for _name, _module in PUBLIC.items():
    setattr(_Package, _name, _public(_name, _module))
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    """Subpackages as attributes (`recast.runtime`) without importing them first."""
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _recast_initializing() -> bool:
    """Whether a recast module is being imported right now (its imports are then unfinished,
    and importing it again would see them half done)."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name == __name__ or name.startswith(f"{__name__}.")
    )


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Imports AUTO_CLASSES right after transformers itself is imported. When a recast module
    is what imports transformers, it is left to that module's own imports (the pipeline, the
    API and `recast.load` all import AUTO_CLASSES)."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_register(module):
                exec_module(module)
                if not _recast_initializing():
                    importlib.import_module(AUTO_CLASSES)

            spec.loader.exec_module = exec_and_register
        return spec


if sys.modules.get("transformers") is not None:
    importlib.import_module(AUTO_CLASSES)
else:  # (where transformers is not installed, the finder is never asked for it)
    sys.meta_path.insert(0, _RegisterWithTransformers())

__all__ = ["RecastError", "__version__", *PUBLIC]
