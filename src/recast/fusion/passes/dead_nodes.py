"""Dead-node elimination: ops and weights that no fused output needs are removed.

    x ─► A ─► output            x ─► A ─► output
         └─► B ─► (unused)  becomes

Outputs a model's entry did not keep (`outputs:` in the recipe), and whatever only they needed,
go; graph inputs stay, since they are the fused model's interface.
"""

from __future__ import annotations

import networkx as nx

from ..graph import FusionGraph
from .base import GraphPass, PassResult


class DeadNodes(GraphPass):
    name = "dead"

    def run(self, graph: FusionGraph) -> PassResult:
        needed = set(graph.outputs.values()).union(
            *(nx.ancestors(graph.g, t) for t in graph.outputs.values())
        )
        dead_ops = [n for n in graph.ops() if n not in needed]
        dead_weights = [n for n in graph.tensors("initializer") if n not in needed]
        saved = sum(graph.g.nodes[n]["nbytes"] for n in dead_weights)
        graph.g.remove_nodes_from(dead_ops)
        graph.g.remove_nodes_from(dead_weights)
        graph.g.remove_nodes_from([n for n in graph.tensors("value") if n not in needed])
        detail = {"initializers_removed": len(dead_weights), "bytes_saved": saved}
        return PassResult(self.name, len(dead_ops), detail)
