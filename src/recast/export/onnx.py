"""ONNX export with torch.onnx's dynamo exporter (opset 18, dynamic batch and sequence axes)."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from ..errors import ExportError
from ..logs import quiet
from .graphs import Traceable
from .lowerings import translation_table

OPSET = 18


def export_onnx(traceable: Traceable, path: Path, moe_op: str, fold: bool = True) -> Path:
    """Export one graph to `path` (weights in `path.data` beside it); raises ExportError.
    `fold=False` skips the exporter's own optimizer (constant folding), leaving each expert
    weight read as `Gather(stacked, e)`; onnxruntime optimizes the bundle either way."""
    try:
        # onnx_ir and onnxscript log every deduplicated initializer and skipped fold at INFO
        with quiet("onnx_ir", "onnxscript", "torch.onnx"):
            program = torch.onnx.export(
                traceable.module,
                traceable.args,
                input_names=traceable.input_names,
                output_names=traceable.output_names,
                # positional, so that args left None (no expert inputs) keep the names
                dynamic_shapes=tuple(traceable.dynamic_shapes.values()),
                custom_translation_table=translation_table(moe_op),
                opset_version=OPSET,
                dynamo=True,
                optimize=fold,
            )
    except Exception as exc:  # the exporter raises many types; keep the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"torch.onnx could not export {path.stem}: {first}") from exc
    program.save(str(path), external_data=True)
    _name_axes(path, traceable)
    return path


def _name_axes(path: Path, traceable: Traceable) -> None:
    """Give dynamic axes their `Dim` names (`batch`, `sequence`, `past`, `total`) everywhere:
    the exporter sometimes keeps its symbols (`s26`), which mean nothing to a runtime user."""
    model = onnx.load(str(path), load_external_data=False)
    wanted = {}
    for value in model.graph.input:
        for axis, name in traceable.axis_names.get(value.name, {}).items():
            wanted[value.type.tensor_type.shape.dim[axis].dim_param] = name
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in wanted:
                dim.dim_param = wanted[dim.dim_param]
    onnx.save(model, str(path))
