"""Fusion passes, one per file. `recast.fusion.fuse` runs `reconcile_opsets` on the models,
then `run_passes` on the fused graph, in this order:

    opset       the models' default-domain opsets brought to the highest (ONNX version converter)
    inputs      inputs that are the same tensor become one graph input
    dedup       initializers with the same content stored once
    cse         the same op on the same inputs computed once (across models)
    dead        ops and weights no output needs removed
    horizontal  parallel MatMul / Gemm / Conv on one input merged into one op and a Split

Each reports its rewrite count (and what it saved) in a `PassResult`.
"""

from __future__ import annotations

import logging

from ..graph import FusionGraph
from .base import GraphPass, PassResult
from .cse import CommonSubexpressions
from .dead_nodes import DeadNodes
from .dedup import DeduplicateInitializers
from .horizontal import HorizontalFusion
from .inputs import UnifyInputs
from .opset import reconcile_opsets

log = logging.getLogger("recast")

# Run order. `dead` comes before `horizontal`, which would merge work for dropped outputs
# into work that is kept.
PASSES: tuple[type[GraphPass], ...] = (
    UnifyInputs,
    DeduplicateInitializers,
    CommonSubexpressions,
    DeadNodes,
    HorizontalFusion,
)
GRAPH_PASSES = tuple(graph_pass.name for graph_pass in PASSES)  # the ones a recipe may skip


def run_passes(graph: FusionGraph, skip=(), **settings) -> list[PassResult]:
    """Every pass not in `skip`, in order, each built with the settings it `takes`."""
    results = []
    for graph_pass in PASSES:
        if graph_pass.name in skip:
            continue
        result = graph_pass(**{key: settings[key] for key in graph_pass.takes}).run(graph)
        log.info("pass %s: %d rewrites", graph_pass.name, result.rewrites)
        results.append(result)
    return results


__all__ = ["GRAPH_PASSES", "PASSES", "GraphPass", "PassResult", "reconcile_opsets", "run_passes"]
