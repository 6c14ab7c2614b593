"""Opset reconciliation: one default-domain opset for every model.

    a (opset 13) ─┐                       a (13 -> 18) ─┐
                  ├─ fused    becomes                   ├─ fused (opset 18)
    b (opset 18) ─┘                       b (18)       ─┘

Models exported at different opsets cannot share a graph; the lower ones are converted with the
ONNX version converter (which rewrites ops whose signature changed, e.g. ReduceSum's axes
attribute becoming an input) instead of refusing to fuse them.
"""

from __future__ import annotations

import onnx
import onnx.version_converter

from ...errors import FusionError
from .base import PassResult


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def reconcile_opsets(models: dict[str, onnx.ModelProto]) -> PassResult:
    """Convert (in `models`, in place) every model below the highest default opset up to it."""
    target = max(default_opset(m) for m in models.values())
    converted = []
    for name, model in models.items():
        if default_opset(model) == target:
            continue
        try:
            models[name] = onnx.version_converter.convert_version(model, target)
        except Exception as exc:  # the converter raises RuntimeError / ConvertError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FusionError(
                f"model {name!r} is opset {default_opset(model)} and cannot be converted to "
                f"opset {target} to match the others ({first}); export it at opset {target}"
            ) from exc
        converted.append(name)
    return PassResult("opset", len(converted), {"opset": target, "converted": converted})
