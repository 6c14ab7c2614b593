"""Bundles' graphs as standard ONNX, and which runtime a graph needs.

A bundle's graph is saved as exported or fused (default domain, the opset it declares), so
any ONNX consumer runs it; onnxruntime fuses it for its provider when a session opens (its
default level, `all`): the same run time and outputs as a graph it optimized offline, for a
few tens of ms more at session open (docs/export.md, "Portable graphs"). Only graphs that
cannot be standard hold onnxruntime's operators: quantized ones (its quantizers emit
`com.microsoft` kernels) and `moe_op: contrib` (`com.microsoft.MoE`). The manifest's
`requires` says which, read from the graph's nodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import onnx
import onnx_ir as ir

# The domains of the ONNX standard ("ai.onnx" is the default domain's long name).
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}

Runtime = Literal["onnx", "onnxruntime"]


def save_graph(source: Path, target: Path) -> Path:
    """`source` as `target`, its weights in `target.data` beside it (tensors of 1 KiB and
    more, as onnxruntime writes them). The weights are copied one at a time from the memory
    mapped source (onnx_ir), never all held at once: a graph of any size, well past
    protobuf's 2 GB, takes no more memory than its largest tensor."""
    ir.save(
        ir.load(str(source)),
        str(target),
        external_data=target.name + ".data",
        size_threshold_bytes=1024,
    )
    return target


def required_runtime(path: Path) -> Runtime:
    """`onnx` if every node of the graph at `path` (subgraphs and local functions included) is
    a standard operator; `onnxruntime` when some node is not (`com.microsoft`, in practice)."""
    model = onnx.load(str(path), load_external_data=False)
    return "onnx" if node_domains(model) <= STANDARD_DOMAINS else "onnxruntime"


def node_domains(model: onnx.ModelProto) -> set[str]:
    """The operator domains of every node; a call of one of the model's own functions counts
    as its body's domains."""
    local = {(f.domain, f.name) for f in model.functions}
    bodies = [model.graph.node, *(f.node for f in model.functions)]
    domains = set()
    while bodies:
        for node in bodies.pop():
            if (node.domain, node.op_type) not in local:
                domains.add(node.domain)
            for attribute in node.attribute:  # If / Loop / Scan bodies
                graphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
                bodies += [graph.node for graph in graphs]
    return domains
