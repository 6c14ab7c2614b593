"""Graph pass: one initializer per expert weight, so experts can be quantized one by one.

The gather lowering reads expert `e` of a stacked `[E, W, H]` weight as

        stacked (initializer) ──► Gather(index = e) ──► Transpose(perm = [1, 0]) ──► MatMul

and this pass replaces the Gather (and the Transpose, when that is its only consumer) with a
new initializer `<stacked name>.<e>.T` holding that expert's (transposed) slice. The stacked
tensor is dropped once nothing reads it. MatMuls that read an expert weight are named
`<stacked name>.<e>.matmul` so quantizers can select them by name.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from ..errors import ExportError


class SplitExpertWeights:
    def __init__(self, stacked: set[str]):
        self.stacked = stacked  # initializer names of the stacked expert weights
        self.rewrites = 0

    def apply(self, model: onnx.ModelProto) -> dict[str, str]:
        """Rewrite `model` in place; returns {per-expert initializer: its MatMul's name}."""
        graph = model.graph
        inits = {i.name: i for i in graph.initializer}
        constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        consumers = _consumers(graph)
        split: dict[str, str] = {}
        removed = []
        for node in list(graph.node):
            if node.op_type != "Gather" or node.input[0] not in self.stacked:
                continue
            expert = int(_constant(node.input[1], inits, constants))
            values = numpy_helper.to_array(inits[node.input[0]], base_dir="")[expert]
            users = consumers.get(node.output[0], [])
            transposes = [u for u in users if u.op_type == "Transpose"]
            if users and len(transposes) == len(users):
                name, values = f"{node.input[0]}.{expert}.T", values.T
                outputs, removed = [t.output[0] for t in transposes], removed + transposes
            else:
                name, outputs = f"{node.input[0]}.{expert}", [node.output[0]]
            graph.initializer.append(numpy_helper.from_array(values.copy(), name))
            for output in outputs:
                for user in consumers.get(output, []):
                    user.input[:] = [name if i == output else i for i in user.input]
                    if user.op_type == "MatMul":
                        user.name = f"{name}.matmul"
                        split[name] = user.name
            removed.append(node)
            self.rewrites += 1
        if not self.rewrites:
            raise ExportError(
                "no expert weights were found to split; the MoE graph is not "
                "in the gather form (moe_op: gather)"
            )
        for node in removed:
            graph.node.remove(node)
        _drop_unused(graph)
        return split


def _consumers(graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _constant(name: str, inits: dict, constants: dict):
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = constants.get(name)
    if node is None:
        raise ExportError(f"expert index {name} is not a constant; cannot split experts")
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name == "value_int":
            return attribute.i
    raise ExportError(f"expert index {name} is not a constant; cannot split experts")


def _drop_unused(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    unused_constants = [
        n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used
    ]
    for node in unused_constants:
        graph.node.remove(node)
