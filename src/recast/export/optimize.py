"""onnxruntime's offline graph optimization, for the graphs that are onnxruntime's anyway.

Quantized graphs (onnxruntime's kernels) are saved optimized at the extended level (constant
folding, Gelu/LayerNorm/attention-pattern fusions); the `all` level adds layout transforms
tied to the exporting machine's CPU, which onnxruntime applies when a session opens the graph.
Standard graphs are saved as exported (`recast.export.portable`): onnxruntime optimizes them
when a session opens, and fusion counts their ops after optimizing a copy.
"""

from __future__ import annotations

import errno
import re
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from ..runtime.backends import providers_for

# How onnxruntime says it could not save the optimized graph (its external initializers).
WRITE_FAILED = re.compile(r"Failed to (write|open for writing)")

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def optimize(source: Path, target_path: Path, target: str, level: str = "extended") -> dict:
    """Write the optimized graph of `source` to `target_path` (+ `.data` for its weights);
    returns node counts before and after, by op type."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.optimized_model_filepath = str(target_path)
    options.log_severity_level = 3
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", target_path.name + ".data"
    )
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    try:
        ort.InferenceSession(str(source), options, providers=providers_for(target))
    except Fail as exc:
        if not WRITE_FAILED.search(str(exc)):
            raise
        # onnxruntime gives no errno; as an OSError about the file, the output's
        # atomic_directory reports it as one OutputWriteError naming the output
        reason = "onnxruntime could not write the graph's weights (is the disk full?)"
        raise OSError(errno.EIO, reason, str(target_path)) from exc
    return {"nodes_before": op_counts(source), "nodes_after": op_counts(target_path)}


def op_counts(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(node.op_type for node in model.graph.node).most_common())


def to_fp16(source: Path, target_path: Path) -> Path:
    """fp16 weights and compute for CUDA; inputs and outputs stay fp32 so feeds do not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(
        model, str(target_path), save_as_external_data=True, location=target_path.name + ".data"
    )
    return target_path


def cuda_usable(artifact: str = "onnx") -> bool:
    """Whether a CUDA device really runs here (onnxruntime-gpu lists its CUDA provider even on
    machines without a GPU, and falls back to the CPU when a session starts)."""
    if artifact == "pt2":
        import torch

        return torch.cuda.is_available()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CUDAExecutionProvider"]
        )
    except Exception:  # no driver, no device: onnxruntime raises its own Fail types
        return False
    return "CUDAExecutionProvider" in session.get_providers()
