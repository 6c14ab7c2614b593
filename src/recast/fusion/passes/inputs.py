"""Input unification: graph inputs that are the same tensor become one input.

    a/input_ids ──► a/Gather            input_ids ──┬─► a/Gather
    b/input_ids ──► b/Gather   becomes              └─► b/Gather

By default, inputs with the same name, dtype and shape (symbolic dims match symbolic dims) are
one input named as before; a `shared_inputs` mapping {fused name: ["model/input", ...]} replaces
that choice (an empty mapping shares nothing). The dims of unified inputs become one dim, so the
fused graph's `batch` is every model's `batch`.
"""

from __future__ import annotations

import networkx as nx
import onnx

from ...errors import FusionError
from ..graph import FusionGraph
from .base import GraphPass, PassResult


def default_groups(graph: FusionGraph) -> dict[str, list[str]]:
    """{name: inputs} for each name that more than one model's input has with the same type."""
    groups: dict[tuple, list[str]] = {}
    for key in graph.inputs:
        plain = key.split("/", 1)[1]
        groups.setdefault((plain, _signature(graph.g.nodes[key]["info"])), []).append(key)
    return {plain: keys for (plain, _), keys in groups.items() if len(keys) > 1}


class UnifyInputs(GraphPass):
    name = "inputs"
    takes = ("shared_inputs",)

    def __init__(self, shared_inputs: dict[str, list[str]] | None = None):
        self.shared_inputs = shared_inputs

    def run(self, graph: FusionGraph) -> PassResult:
        groups = default_groups(graph) if self.shared_inputs is None else self.shared_inputs
        self._check(graph, groups)
        dims = nx.utils.UnionFind()
        merged = 0
        for fused, keys in groups.items():
            first, *rest = keys
            for key in rest:
                self._unify_dims(graph, first, key, dims)
                graph.replace_tensor(key, first)
                merged += 1
            graph.rename_tensor(first, fused)
        for value in graph.value_infos():
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = dims[dim.dim_param]
        return PassResult(self.name, merged, {"shared": {k: list(v) for k, v in groups.items()}})

    def _check(self, graph: FusionGraph, groups: dict[str, list[str]]) -> None:
        seen: dict[str, str] = {}
        for fused, keys in groups.items():
            if not keys:
                raise FusionError(f"shared input {fused!r} lists no model inputs")
            if fused in graph.g and fused not in keys:
                raise FusionError(f"shared input name {fused!r} is already a tensor; rename it")
            for key in keys:
                if key not in graph.inputs:
                    raise FusionError(
                        f"shared input {fused!r}: {key!r} is not a model input; the inputs are "
                        f"{', '.join(graph.inputs)}"
                    )
                if key in seen:
                    raise FusionError(f"{key!r} is listed under both {seen[key]!r} and {fused!r}")
                seen[key] = fused
                a, b = graph.g.nodes[keys[0]]["info"], graph.g.nodes[key]["info"]
                if not _compatible(a, b):
                    raise FusionError(
                        f"shared input {fused!r}: {keys[0]} is {_describe(a)} but {key} is "
                        f"{_describe(b)}; only tensors of one dtype and shape can be one input"
                    )

    @staticmethod
    def _unify_dims(graph: FusionGraph, first: str, other: str, dims) -> None:
        a = graph.g.nodes[first]["info"].type.tensor_type.shape.dim
        b = graph.g.nodes[other]["info"].type.tensor_type.shape.dim
        for x, y in zip(a, b, strict=True):
            if x.dim_param and y.dim_param:
                dims.union(x.dim_param, y.dim_param)
            elif y.HasField("dim_value"):  # the input has that size for every model
                x.dim_value = y.dim_value


def _dims(info: onnx.ValueInfoProto) -> list[int | None]:
    """Static sizes, None for symbolic or unknown dims."""
    return [d.dim_value if d.HasField("dim_value") else None for d in _shape(info)]


def _shape(info: onnx.ValueInfoProto):
    return info.type.tensor_type.shape.dim


def _signature(info: onnx.ValueInfoProto) -> tuple:
    return info.type.tensor_type.elem_type, tuple(_dims(info))


def _compatible(a: onnx.ValueInfoProto, b: onnx.ValueInfoProto) -> bool:
    ta, tb = a.type.tensor_type, b.type.tensor_type
    if ta.elem_type != tb.elem_type or len(ta.shape.dim) != len(tb.shape.dim):
        return False
    return all(x is None or y is None or x == y for x, y in zip(_dims(a), _dims(b), strict=True))


def _describe(info: onnx.ValueInfoProto) -> str:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).name
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in _shape(info)]
    return f"{dtype} {shape}"
