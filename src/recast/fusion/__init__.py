"""Fusion: several models in one DAG with shared weights, shared computation and merged
parallel work (`recast fuse`, `recast.fuse`). See `fuse.py` for the pipeline, `graph.py` for
the IR and `passes/` for the rewrites."""

from .fuse import fuse
from .recipe import FusionRecipe, load_fusion_recipe
from .sources import TorchModel

__all__ = ["FusionRecipe", "TorchModel", "fuse", "load_fusion_recipe"]
