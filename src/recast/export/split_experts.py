"""Graph pass: one initializer per expert weight, so that no weight is folded at session open.

The gather lowering reads expert `e` of stacked `[E, W, H]` weights as

    gate (initializer) ─► Gather(e) ─┐
                                      ├─► Concat ─► Transpose ─► MatMul      (SwiGLU: fused)
    up   (initializer) ─► Gather(e) ─┘
    down (initializer) ─► Gather(e) ─► Transpose ─► MatMul

Left so, onnxruntime's constant folding materialises every Gather, Concat and Transpose when a
session opens: a second and third copy of the expert weights in memory beside the mapped
file (3.6x the weights at 0.5B, docs/PERFORMANCE.md). This pass replaces each Gather with an
initializer `<stacked name>.<e>`, folds the Concat / Transpose nodes whose inputs are all such
initializers, and drops the stacked tensors, so every expert MatMul reads one constant weight
of its own, stored as it is used. The new weights are lazy (onnx_ir): each is computed from
the memory-mapped stacked tensor as it is written, so the pass holds one expert weight at a
time whatever the graph's size. The MatMuls are renamed `<weight>.matmul` for per-expert
quantizers to select by name.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnx_ir as ir
from torch import nn

from ..errors import ExportError


def stacked_expert_weights(model: nn.Module, banks=("experts", "shared")) -> dict[str, int]:
    """{initializer name of a stacked weight of `banks` in the exported graph: layer index}."""
    from ..refactor.moe import MoEFFN

    stacked = {}
    for path, moe in model.named_modules():
        for bank in banks if isinstance(moe, MoEFFN) else ():
            for projection in ("up", "gate", "down"):
                if getattr(getattr(moe, bank), projection, None) is not None:
                    stacked[f"model.{path}.{bank}.{projection}"] = moe.layer_index
    return stacked


def split_expert_weights(source: Path, target: Path, stacked: set[str]) -> dict[str, tuple]:
    """Write the graph at `source` to `target` (+ `.data`) with the experts of the `stacked`
    weights split; returns {MatMul name: (stacked weight, expert)}."""
    model = ir.load(str(source))
    graph = model.graph
    origin: dict[str, tuple[str, int]] = {}
    values: dict[str, ir.Value] = {}  # per-expert weights, lazily computed
    for node in list(graph):
        data = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
        if data is None or data.name not in stacked or _axis(node) != 0:
            continue
        expert = _index(node.inputs[1])
        name = f"{data.name}.{expert}"
        if name not in values:
            tensor = data.const_value
            make = partial(_expert_of, tensor, expert)
            values[name] = _lazy(graph, name, make, tensor.dtype, tensor.shape[1:])
            origin[name] = (data.name, expert)
        node.outputs[0].replace_all_uses_with(values[name])
        graph.remove(node, safe=True)
    if not values:
        return {}
    _fold(graph, origin, values)
    matmuls = {}
    for node in graph:
        if node.op_type == "MatMul" and node.inputs[1] is not None:
            if node.inputs[1].name in origin:
                node.name = f"{node.inputs[1].name}.matmul"
                matmuls[node.name] = origin[node.inputs[1].name]
    _drop_unused(graph)
    ir.save(model, str(target), external_data=target.name + ".data", size_threshold_bytes=1024)
    return matmuls


def _fold(graph, origin: dict, values: dict) -> None:
    """Fold Concat and Transpose nodes that read only per-expert weights (lazily)."""
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.op_type not in ("Concat", "Transpose") or not node.inputs:
                continue
            names = [v.name if v is not None else None for v in node.inputs]
            if not all(n in values for n in names):
                continue
            parts = [values[n].const_value.numpy for n in names]
            shapes = [list(values[n].shape) for n in names]
            if node.op_type == "Concat":
                axis = node.attributes["axis"].as_int()
                name = "+".join(names)
                make = partial(_concatenated, parts, axis)
                shape = shapes[0]
                shape[axis] = sum(s[axis] for s in shapes)
            else:
                perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else None
                perm = list(perm) if perm is not None else list(range(len(shapes[0])))[::-1]
                name = f"{names[0]}.T"
                make = partial(_transposed, parts[0], perm)
                shape = [shapes[0][i] for i in perm]
            out = node.outputs[0]
            values[name] = _lazy(graph, name, make, values[names[0]].dtype, shape)
            origin[name] = origin[names[0]]
            out.replace_all_uses_with(values[name])
            graph.remove(node, safe=True)
            changed = True


def _expert_of(stacked, expert: int) -> np.ndarray:
    return stacked.numpy()[expert]


def _concatenated(parts: list[Callable[[], np.ndarray]], axis: int) -> np.ndarray:
    return np.concatenate([part() for part in parts], axis=axis)


def _transposed(part: Callable[[], np.ndarray], perm: list[int]) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(part(), perm))


def _lazy(graph, name: str, make: Callable[[], np.ndarray], dtype, shape) -> ir.Value:
    shape = [int(d) for d in shape]
    tensor = ir.LazyTensor(lambda: ir.tensor(make()), dtype=dtype, shape=ir.Shape(shape))
    value = ir.Value(
        name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def _axis(node) -> int:
    return node.attributes["axis"].as_int() if "axis" in node.attributes else 0


def _index(value) -> int:
    tensor = value.const_value if value is not None else None
    if tensor is None and value is not None and value.producer() is not None:
        producer = value.producer()
        if producer.op_type == "Constant" and "value_int" in producer.attributes:
            return producer.attributes["value_int"].as_int()
        if producer.op_type == "Constant" and "value" in producer.attributes:
            tensor = producer.attributes["value"].as_tensor()
    if tensor is None:
        what = value.producer().op_type if value is not None and value.producer() else "input"
        raise ExportError(f"expert index {value and value.name} is not a constant ({what})")
    return int(tensor.numpy())


def _drop_unused(graph) -> None:
    """The stacked weights, and the Constant index nodes, once nothing reads them."""
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
    for node in list(graph):
        if node.op_type == "Constant" and not any(out.uses() for out in node.outputs):
            graph.remove(node, safe=True)
