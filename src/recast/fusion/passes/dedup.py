"""Initializer deduplication: weights with the same content are stored once.

    a/W (sha256 x) ──► a/MatMul          W (sha256 x) ──┬─► a/MatMul
    b/W (sha256 x) ──► b/MatMul   becomes               └─► b/MatMul

Content is compared by sha256 over dtype, shape and bytes, at any size (onnx_ir's pass skips
tensors above 1024 elements, which are the ones that matter here); weights in external data
files are hashed from their byte ranges when the models are read, so nothing is loaded twice.
"""

from __future__ import annotations

from ..graph import FusionGraph
from .base import GraphPass, PassResult


class DeduplicateInitializers(GraphPass):
    name = "dedup"

    def run(self, graph: FusionGraph) -> PassResult:
        kept: dict[str, str] = {}
        removed = saved = 0
        for key in sorted(graph.tensors("initializer")):
            node = graph.g.nodes[key]
            first = kept.setdefault(node["digest"], key)
            if first != key:
                saved += node["nbytes"]
                graph.replace_tensor(key, first)
                removed += 1
        return PassResult(self.name, removed, {"bytes_saved": saved})
