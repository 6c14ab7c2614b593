"""The fusion IR: every model's nodes and tensors in one networkx DiGraph.

Nodes are of two kinds, told apart by their `kind` attribute:

- tensors, keyed `model/name` (a unified graph input keeps its plain name): `role` is
  `input`, `initializer` or `value`; initializers carry their `TensorProto` (possibly still
  pointing into an external data file under `base`), a content `digest` and `nbytes`;
- ops, keyed `model/#i`: `op_type`, `domain`, `attrs` (AttributeProtos), and the ordered
  `inputs` / `outputs` tensor keys ("" for an omitted optional input).

Edges run tensor -> op (consumed) and op -> tensor (produced), so networkx's reachability
and topological order are the graph's. `outputs` maps each fused output name `model/output` to
the tensor that holds it; passes keep that map right when they replace a tensor.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from ..errors import FusionError

INLINE_BYTES = 1024  # smaller initializers stay in the graph file
CONTROL_FLOW = ("If", "Loop", "Scan", "SequenceMap")


@dataclass
class FusionGraph:
    g: nx.DiGraph = field(default_factory=nx.DiGraph)
    inputs: list[str] = field(default_factory=list)  # graph input tensor keys, in order
    outputs: dict[str, str] = field(default_factory=dict)  # "model/output" -> tensor key
    output_info: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)  # dtype, shape
    opsets: dict[str, int] = field(default_factory=dict)
    ir_version: int = 8
    models: list[str] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count)

    # -- building ---------------------------------------------------------------------------

    def add_model(self, name: str, model: onnx.ModelProto, base: Path | None) -> None:
        """Add `model`'s graph under the `name/` namespace (weights stay where they are)."""
        graph, prefix = model.graph, f"{name}/"
        self.models.append(name)
        for domain in model.opset_import:
            key = domain.domain or ""
            self.opsets[key] = max(self.opsets.get(key, 0), domain.version)
        self.ir_version = max(self.ir_version, model.ir_version)
        weights = {t.name for t in graph.initializer}
        for tensor in graph.initializer:
            self.add_initializer(prefix + tensor.name, tensor, base, name)
        for value in graph.input:
            if value.name in weights:  # IR < 4 lists initializers as inputs too
                continue
            key = prefix + value.name
            info = _namespaced_dims(value, prefix)
            self.g.add_node(key, kind="tensor", role="input", model=name, info=info)
            self.inputs.append(key)
        for i, node in enumerate(graph.node):
            if node.op_type in CONTROL_FLOW or any(a.g.node or a.graphs for a in node.attribute):
                raise FusionError(
                    f"model {name!r} has a {node.op_type} node with a subgraph: fusion handles "
                    "graphs without control flow; export the model without it"
                )
            self.add_op(
                f"{prefix}#{i}",
                node.op_type,
                [prefix + t if t else "" for t in node.input],
                [prefix + t if t else "" for t in node.output],
                domain=node.domain,
                attrs=list(node.attribute),
                model=name,
            )
        for value in graph.output:
            out = prefix + value.name
            if out not in self.g:
                raise FusionError(f"model {name!r}: output {value.name!r} is produced by no node")
            self.outputs[out] = out
            self.output_info[out] = _namespaced_dims(value, prefix)

    def add_initializer(
        self, key: str, tensor: onnx.TensorProto, base: Path | None, model: str
    ) -> None:
        data = tensor_bytes(tensor, base)
        digest = hashlib.sha256(
            f"{tensor.data_type}:{list(tensor.dims)}:".encode() + data
        ).hexdigest()
        self.g.add_node(
            key,
            kind="tensor",
            role="initializer",
            model=model,
            proto=tensor,
            base=base,
            digest=digest,
            nbytes=len(data),
        )

    def add_array(self, key: str, array: np.ndarray, model: str) -> None:
        self.add_initializer(key, numpy_helper.from_array(array, key), None, model)

    def add_op(
        self,
        key: str,
        op_type: str,
        inputs: list[str],
        outputs: list[str],
        *,
        domain: str = "",
        attrs: list | None = None,
        model: str,
    ) -> None:
        self.g.add_node(
            key,
            kind="op",
            model=model,
            op_type=op_type,
            domain=domain,
            attrs=attrs or [],
            inputs=list(inputs),
            outputs=list(outputs),
        )
        for tensor in inputs:
            if tensor:
                if tensor not in self.g:
                    raise FusionError(f"{key} ({op_type}) reads {tensor}, which nothing defines")
                self.g.add_edge(tensor, key)
        for tensor in filter(None, outputs):
            if tensor not in self.g:
                self.g.add_node(tensor, kind="tensor", role="value", model=model)
            self.g.add_edge(key, tensor)

    def new_key(self, model: str, what: str) -> str:
        return f"{model}/fusion.{what}.{next(self._ids)}"

    def value_infos(self) -> list[onnx.ValueInfoProto]:
        """The (mutable) type of every graph input and fused output."""
        return [self.g.nodes[k]["info"] for k in self.inputs] + list(self.output_info.values())

    def name_dims(self) -> None:
        """`a/batch` -> `batch` wherever no other model's dim is also called `batch`."""
        dims = [d for v in self.value_infos() for d in v.type.tensor_type.shape.dim if d.dim_param]
        by_base: dict[str, set[str]] = {}
        for dim in dims:
            by_base.setdefault(dim.dim_param.split("/", 1)[-1], set()).add(dim.dim_param)
        for dim in dims:
            base = dim.dim_param.split("/", 1)[-1]
            if len(by_base[base]) == 1:
                dim.dim_param = base

    # -- queries ----------------------------------------------------------------------------

    def ops(self) -> list[str]:
        """Op keys in a topological order."""
        return [n for n in nx.topological_sort(self.g) if self.g.nodes[n]["kind"] == "op"]

    def tensors(self, role: str) -> list[str]:
        return [n for n, d in self.g.nodes(data=True) if d.get("role") == role]

    def consumers(self, tensor: str) -> list[str]:
        return list(self.g.successors(tensor))

    def producer(self, tensor: str) -> str | None:
        return next(iter(self.g.predecessors(tensor)), None)

    def array(self, key: str) -> np.ndarray:
        node = self.g.nodes[key]
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node["proto"])
        if uses_external_data(tensor):
            _load_external(tensor, node["base"])
        return numpy_helper.to_array(tensor)

    def initializer_bytes(self) -> int:
        return sum(self.g.nodes[k]["nbytes"] for k in self.tensors("initializer"))

    def owners(self) -> dict[str, frozenset[str]]:
        """{op key: the models whose outputs need it}."""
        needed: dict[str, set[str]] = {}
        for out, tensor in self.outputs.items():
            model = out.split("/", 1)[0]
            for node in nx.ancestors(self.g, tensor) | {tensor}:
                needed.setdefault(node, set()).add(model)
        return {
            op: frozenset(needed.get(op, ()))
            for op, d in self.g.nodes(data=True)
            if d["kind"] == "op"
        }

    # -- rewriting --------------------------------------------------------------------------

    def replace_tensor(self, old: str, new: str) -> None:
        """Every reader of `old` (ops and fused outputs) reads `new` instead; `old` goes."""
        for op in self.consumers(old):
            node = self.g.nodes[op]
            node["inputs"] = [new if t == old else t for t in node["inputs"]]
            self.g.add_edge(new, op)
        for out, tensor in self.outputs.items():
            if tensor == old:
                self.outputs[out] = new
        if old in self.inputs:
            self.inputs.remove(old)
        self.g.remove_node(old)

    def rename_tensor(self, old: str, new: str) -> None:
        if old == new:
            return
        self.g.add_node(new, **self.g.nodes[old])
        position = self.inputs.index(old) if old in self.inputs else None
        self.replace_tensor(old, new)
        if position is not None:
            self.inputs.insert(position, new)

    def remove_op(self, op: str, drop_outputs: bool = True) -> None:
        outputs = self.g.nodes[op]["outputs"]
        self.g.remove_node(op)
        if drop_outputs:
            self.g.remove_nodes_from(t for t in outputs if t in self.g and not self.consumers(t))

    # -- emitting ---------------------------------------------------------------------------

    def to_onnx(self, data_path: Path) -> onnx.ModelProto:
        """The fused model; every initializer is streamed into `data_path` (external data, so
        no 2 GB protobuf limit), each read from its source only now."""
        nodes, initializers = [], []
        for op in self.ops():
            d = self.g.nodes[op]
            node = onnx.helper.make_node(
                d["op_type"], d["inputs"], d["outputs"], name=op, domain=d["domain"] or None
            )
            node.attribute.extend(d["attrs"])
            nodes.append(node)
        with open(data_path, "wb") as data:
            for key in sorted(self.tensors("initializer")):
                initializers.append(self._external(key, data, data_path.name))
        inputs = [_renamed(self.g.nodes[key]["info"], key) for key in self.inputs]
        outputs = []
        for out, tensor in self.outputs.items():
            if tensor != out:  # shared with another output, or a tensor of another name
                nodes.append(onnx.helper.make_node("Identity", [tensor], [out], name=f"{out}#out"))
            outputs.append(_renamed(self.output_info[out], out))
        graph = onnx.helper.make_graph(nodes, "recast_fused", inputs, outputs, initializers)
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in sorted(self.opsets.items())]
        model = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="recast")
        model.ir_version = self.ir_version
        return model

    def _external(self, key: str, data, location: str) -> onnx.TensorProto:
        node = self.g.nodes[key]
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node["proto"])
        payload = tensor_bytes(tensor, node["base"])
        tensor.name = key
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(typed)
        tensor.data_location = onnx.TensorProto.DEFAULT
        if len(payload) < INLINE_BYTES:  # shapes and split sizes: shape inference reads them
            tensor.raw_data = payload
            return tensor
        offset = data.tell()
        data.write(payload)
        data.write(b"\0" * (-len(payload) % 64))  # aligned, so a runtime can map it
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for field_name, value in (
            ("location", location),
            ("offset", offset),
            ("length", len(payload)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = field_name, str(value)
        return tensor


def _renamed(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    value = onnx.ValueInfoProto()
    value.CopyFrom(info)
    value.name = name
    return value


def _namespaced_dims(info: onnx.ValueInfoProto, prefix: str) -> onnx.ValueInfoProto:
    """A copy whose symbolic dims are the model's own (`a/batch`), until inputs unify them."""
    value = _renamed(info, info.name)
    for dim in value.type.tensor_type.shape.dim:
        if dim.dim_param:
            dim.dim_param = prefix + dim.dim_param
    return value


def tensor_bytes(tensor: onnx.TensorProto, base: Path | None) -> bytes:
    """The raw little-endian bytes of an initializer, read from its external file if it has one
    (only that tensor's range)."""
    if uses_external_data(tensor):
        info = {e.key: e.value for e in tensor.external_data}
        if base is None:
            raise FusionError(f"initializer {tensor.name} has external data but no base folder")
        path = Path(base) / info["location"]
        try:
            with open(path, "rb") as f:
                f.seek(int(info.get("offset", 0)))
                length = info.get("length")
                return f.read(int(length)) if length is not None else f.read()
        except OSError as exc:
            raise FusionError(
                f"initializer {tensor.name}: cannot read its external data {path} ({exc.strerror})"
            ) from exc
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _load_external(tensor: onnx.TensorProto, base: Path | None) -> None:
    tensor.raw_data = tensor_bytes(tensor, base)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
