"""Common-subexpression elimination across models: the same op on the same inputs runs once.

    input_ids ─┬─► a/Gather(E) ─► a/layers ...        input_ids ─► Gather(E) ─┬─► a/head
               └─► b/Gather(E) ─► b/layers ...  becomes                       └─► b/head

After inputs are unified and weights deduplicated, a backbone that several models share reads
identical tensors, so walking the graph in topological order and keying each op by (domain,
op type, attributes, inputs) finds it layer by layer: every op of the second copy maps onto the
first, and its readers read the first copy's outputs. Ops that draw random numbers are never
merged.
"""

from __future__ import annotations

from ..graph import FusionGraph
from .base import GraphPass, PassResult

RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}


def op_key(graph: FusionGraph, op: str) -> tuple:
    d = graph.g.nodes[op]
    attrs = tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in d["attrs"]))
    return (
        d["domain"] or "",
        d["op_type"],
        attrs,
        tuple(d["inputs"]),
        tuple(map(bool, d["outputs"])),
    )


class CommonSubexpressions(GraphPass):
    name = "cse"

    def run(self, graph: FusionGraph) -> PassResult:
        seen: dict[tuple, str] = {}
        removed = across = 0
        for op in graph.ops():
            d = graph.g.nodes[op]
            if d["op_type"] in RANDOM:
                continue
            first = seen.setdefault(op_key(graph, op), op)
            if first == op:
                continue
            kept_outputs = graph.g.nodes[first]["outputs"]
            duplicate_outputs = d["outputs"]
            graph.remove_op(op, drop_outputs=False)
            for old, new in zip(duplicate_outputs, kept_outputs, strict=True):
                if old:  # "" is an optional output nobody asked for
                    graph.replace_tensor(old, new)
            removed += 1
            across += graph.g.nodes[first]["model"] != d["model"]
        return PassResult(self.name, removed, {"across_models": across})
