"""Graph pass: one initializer per expert weight, so experts can be quantized one by one.

The gather lowering reads expert `e` of stacked `[E, W, H]` weights as

    gate (initializer) ─► Gather(e) ─┐
                                      ├─► Concat ─► Transpose ─► MatMul      (SwiGLU: fused)
    up   (initializer) ─► Gather(e) ─┘
    down (initializer) ─► Gather(e) ─► Transpose ─► MatMul

This pass replaces each Gather with a new initializer `<stacked name>.<e>`, then folds the
Concat / Transpose nodes whose inputs are all such initializers, so every expert MatMul reads
one constant weight of its own. Those MatMuls are renamed `<weight>.matmul` for quantizers to
select by name; the stacked tensors are dropped once nothing reads them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ExportError


class SplitExpertWeights:
    def __init__(self, stacked: set[str]):
        self.stacked = stacked  # initializer names of the stacked expert weights
        self.rewrites = 0

    def apply(self, model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
        """Rewrite `model` in place; returns {MatMul name: (stacked weight, expert)}."""
        graph = model.graph
        values = {i.name: i for i in graph.initializer}
        constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        origin: dict[str, tuple[str, int]] = {}  # per-expert initializer -> (stacked, expert)
        arrays: dict[str, np.ndarray] = {}
        for node in list(graph.node):
            if node.op_type == "Gather" and node.input[0] in self.stacked:
                expert = int(_constant(node.input[1], values, constants))
                name = f"{node.input[0]}.{expert}"
                arrays[name] = numpy_helper.to_array(values[node.input[0]])[expert]
                origin[name] = (node.input[0], expert)
                self._replace(graph, node, name)
        if not self.rewrites:
            raise ExportError(
                "no expert weights were found to split; per-expert quantization needs the "
                "gather form of the MoE layers (moe_op: gather)"
            )
        self._fold(graph, origin, arrays)
        for name, array in arrays.items():
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        matmuls = {}
        for node in graph.node:
            if node.op_type == "MatMul" and node.input[1] in origin:
                node.name = f"{node.input[1]}.matmul"
                matmuls[node.name] = origin[node.input[1]]
        _drop_unused(graph)
        return matmuls

    def _replace(self, graph, node, name: str) -> None:
        for user in graph.node:
            user.input[:] = [name if i == node.output[0] else i for i in user.input]
        graph.node.remove(node)
        self.rewrites += 1

    def _fold(self, graph, origin: dict, arrays: dict) -> None:
        """Fold Concat and Transpose nodes that read only per-expert weights."""
        changed = True
        while changed:
            changed = False
            for node in list(graph.node):
                if node.op_type not in ("Concat", "Transpose"):
                    continue
                if not node.input or not all(i in arrays for i in node.input):
                    continue
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                if node.op_type == "Concat":
                    name = "+".join(node.input)
                    array = np.concatenate([arrays[i] for i in node.input], axis=attrs["axis"])
                else:
                    name = f"{node.input[0]}.T"
                    array = np.transpose(arrays[node.input[0]], attrs.get("perm"))
                arrays[name], origin[name] = array, origin[node.input[0]]
                self._replace(graph, node, name)
                changed = True
        used = {i for node in graph.node for i in node.input}
        for name in [n for n in arrays if n not in used]:
            del arrays[name]


def _constant(name: str, values: dict, constants: dict):
    if name in values:
        return numpy_helper.to_array(values[name])
    node = constants.get(name)
    for attribute in node.attribute if node is not None else []:
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
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
