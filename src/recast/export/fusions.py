"""Transformer fusions for onnxruntime on dynamo-exported graphs (`export.graph: fused`).

onnxruntime's own optimizer, when a session opens a standard graph, fuses LayerNorm, MatMul
and Gelu patterns but finds none of the attention patterns the dynamo exporter writes, and
leaves the exact Gelu as Erf nodes (docs/PERFORMANCE.md, "Export against the peers").
onnxscript's `ort_fusions` rewriter matches those graphs: attention (Attention,
MultiHeadAttention, GroupQueryAttention), SkipLayerNormalization and its RMS form, BiasGelu,
RotaryEmbedding and SimplifiedLayerNormalization, as onnxruntime's `com.microsoft` kernels,
so a fused graph needs onnxruntime (the manifest's `requires` says so). The MoE nodes of the
gather lowering are standard ops and stay as they are.

One rule of recast's own runs first: GPT-2's Conv1D exports as a Gemm on rows flattened to 2-D,
and onnxscript's attention fusion (0.7.2) takes the head-merging Reshape before the output
projection's Gemm for its own output, which is 3-D: a Gemm refuses it, a MatMul does not.
So plain Gemms become MatMul + Add first (onnxscript's own rule for that wants static shapes).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx_ir as ir
from onnxscript.rewriter import RewriteRule, rewrite

from ..errors import ExportError
from ..logs import quiet

# onnxruntime's fused operators, the kinds its transformers optimizer reports
# (`get_fused_operator_statistics`): what the manifest counts per graph.
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "RotaryEmbedding",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "FusedMatMul",
)


def _gemm(op, rows, weight, bias):
    return op.Gemm(rows, weight, bias)


def _matmul_add(op, rows, weight, bias):
    return op.Add(op.MatMul(rows, weight), bias)


def _plain(context, **_) -> bool:
    """No transposes, unit scales: MatMul + Add computes the same."""
    given = {name: attr.value for name, attr in context.root.attributes.items()}
    defaults = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    return all(given.get(name, value) == value for name, value in defaults.items())


GEMM_AS_MATMUL = RewriteRule(_gemm, _matmul_add, _plain)


def fuse_for_ort(source: Path, target: Path) -> dict[str, int]:
    """Write `source` with onnxscript's onnxruntime fusions applied to `target` (+ `.data`);
    returns the fused operators it holds, by kind."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(source))
    try:
        with quiet("onnx_ir", "onnxscript"):
            rewrite(model, [GEMM_AS_MATMUL])
            model, _ = optimize_for_ort(model)
        forget_inner_shapes(model)
    except Exception as exc:  # a rewrite rule failing on a graph is an export failure
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(
            f"onnxscript could not fuse {source.stem}: {first}; export with graph: portable"
        ) from exc
    ir.save(model, str(target), external_data=target.name + ".data", size_threshold_bytes=1024)
    return fused_operators(model)


def forget_inner_shapes(model: ir.Model) -> None:
    """Drop the shapes the rewriter's shape inference recorded inside the graph: in the MoE
    branches it names one dimension for blocks whose sizes differ at run time (each expert's
    rows), which onnxruntime then trusts to share buffers. onnxruntime infers its own."""
    for node in model.graph.all_nodes():
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None


def fused_operators(model: ir.Model) -> dict[str, int]:
    counts = Counter(node.op_type for node in model.graph.all_nodes())
    return {op: counts[op] for op in FUSED_OPS if counts[op]}
