"""Horizontal fusion: parallel MatMul / Gemm / Conv ops on one input become one op and a Split.

    x ─┬─► MatMul(W1) ─► y1                         ┌─► y1
       ├─► MatMul(W2) ─► y2   becomes   x ─► MatMul([W1|W2|W3]) ─► Split ─┼─► y2
       └─► MatMul(W3) ─► y3                         └─► y3

Several task heads on a shared backbone, or one layer's query / key / value projections, read
the same tensor; one wider matmul does their work in a single kernel (HFTA, NetFuse). Only
constant weights read by that op alone are concatenated (a weight used elsewhere too would be
stored twice), and only ops whose other settings agree: Gemm's alpha, beta and transposes,
Conv's kernel, strides, pads, dilations and group 1. Biases are concatenated alongside.
"""

from __future__ import annotations

import numpy as np

from ..graph import FusionGraph
from .base import GraphPass, PassResult

MIN_GROUP = 2
SPLIT_AS_INPUT = 13  # the opset from which Split takes its sizes as an input


class HorizontalFusion(GraphPass):
    name = "horizontal"

    def run(self, graph: FusionGraph) -> PassResult:
        if graph.opsets.get("", 0) < SPLIT_AS_INPUT:
            return PassResult(self.name, 0, {"skipped": f"needs opset {SPLIT_AS_INPUT}+"})
        groups = merged = 0
        for tensor in [n for n, d in graph.g.nodes(data=True) if d["kind"] == "tensor"]:
            if tensor not in graph.g:
                continue
            buckets: dict[tuple, list[str]] = {}
            for op in graph.consumers(tensor):
                signature = self._signature(graph, op, tensor)
                if signature is not None:
                    buckets.setdefault(signature, []).append(op)
            for signature, ops in buckets.items():
                if len(ops) >= MIN_GROUP:
                    self._fuse(graph, tensor, sorted(ops), signature[0])
                    groups += 1
                    merged += len(ops)
        return PassResult(self.name, groups, {"ops_merged": merged})

    def _signature(self, graph: FusionGraph, op: str, tensor: str) -> tuple | None:
        """What ops must share to be fused with `op` (None: `op` cannot be)."""
        d = graph.g.nodes[op]
        if d["op_type"] not in ("MatMul", "Gemm", "Conv") or d["domain"]:
            return None
        if len(d["inputs"]) < 2 or d["inputs"][0] != tensor or tensor in d["inputs"][1:]:
            return None
        op_type, attrs = d["op_type"], {a.name: a for a in d["attrs"]}
        weights = [t for t in d["inputs"][1:] if t]
        if not all(self._own_constant(graph, t, op) for t in weights):
            return None
        weight = graph.g.nodes[d["inputs"][1]]["proto"]
        has_bias = len(weights) == 2
        settings = tuple(
            sorted((k, a.SerializeToString(deterministic=True)) for k, a in attrs.items())
        )
        if op_type == "MatMul" and len(weight.dims) == 2:
            return op_type, weight.data_type, weight.dims[0]
        if op_type == "Gemm" and not _int(attrs, "transA", 0):
            transposed = _int(attrs, "transB", 0)
            k, n = (weight.dims[1], weight.dims[0]) if transposed else weight.dims
            if has_bias and list(graph.g.nodes[d["inputs"][2]]["proto"].dims) != [n]:
                return None  # a broadcast bias cannot be concatenated
            return op_type, weight.data_type, k, settings, has_bias
        if op_type == "Conv" and _int(attrs, "group", 1) == 1:
            return op_type, weight.data_type, tuple(weight.dims[1:]), settings, has_bias
        return None

    @staticmethod
    def _own_constant(graph: FusionGraph, tensor: str, op: str) -> bool:
        node = graph.g.nodes[tensor]
        return node["role"] == "initializer" and graph.consumers(tensor) == [op]

    def _fuse(self, graph: FusionGraph, tensor: str, ops: list[str], op_type: str) -> None:
        first = graph.g.nodes[ops[0]]
        model = first["model"]
        transposed = op_type == "Gemm" and _int({a.name: a for a in first["attrs"]}, "transB", 0)
        weight_axis = 0 if op_type == "Conv" or transposed else 1
        split_axis = -1 if op_type == "MatMul" else 1
        weights = [graph.array(graph.g.nodes[op]["inputs"][1]) for op in ops]
        sizes = [w.shape[weight_axis] for w in weights]
        inputs = [tensor, self._constant(graph, np.concatenate(weights, weight_axis), model)]
        if len(first["inputs"]) > 2 and first["inputs"][2]:
            biases = [graph.array(graph.g.nodes[op]["inputs"][2]) for op in ops]
            inputs.append(self._constant(graph, np.concatenate(biases), model))
        outputs = [graph.g.nodes[op]["outputs"][0] for op in ops]
        attrs, domain = first["attrs"], first["domain"]
        for op in ops:
            weights_read = graph.g.nodes[op]["inputs"][1:]
            graph.remove_op(op, drop_outputs=False)
            graph.g.remove_nodes_from([t for t in weights_read if t])
        wide = graph.new_key(model, f"{op_type}.wide")
        graph.add_op(
            graph.new_key(model, op_type),
            op_type,
            inputs,
            [wide],
            domain=domain,
            attrs=attrs,
            model=model,
        )
        split = self._constant(graph, np.array(sizes, np.int64), model)
        graph.add_op(
            graph.new_key(model, "Split"),
            "Split",
            [wide, split],
            outputs,
            attrs=[_axis(split_axis)],
            model=model,
        )

    @staticmethod
    def _constant(graph: FusionGraph, array: np.ndarray, model: str) -> str:
        key = graph.new_key(model, "concat")
        graph.add_array(key, array, model)
        return key


def _int(attrs: dict, name: str, default: int) -> int:
    return attrs[name].i if name in attrs else default


def _axis(value: int):
    import onnx

    return onnx.helper.make_attribute("axis", value)
