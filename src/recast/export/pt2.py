"""pt2 artifacts: a `torch.export` program (`torch.export.save`), optionally AOTInductor-compiled.

The MoE layer stays one `recast::routed_experts` op, so loading a pt2 bundle needs torch and
recast (the runtime imports `recast.export.ops` to register the op).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from ..errors import ExportError
from . import ops  # noqa: F401  registers recast::routed_experts for torch.export
from .graphs import Traceable


def export_pt2(traceable: Traceable, path: Path, compile: bool = False) -> Path:
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.export.export(
                traceable.module,
                traceable.args,
                dynamic_shapes=tuple(traceable.dynamic_shapes.values()),
                strict=False,
            )
    except Exception as exc:  # torch.export raises many types; keep the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"torch.export could not export {path.stem}: {first}") from exc
    torch.export.save(program, str(path))
    if compile:
        _aot_compile(program, path.with_suffix(".aoti.pt2"))
    return path


def _aot_compile(program, path: Path) -> None:
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:  # no compiler, unsupported op: inductor raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"AOTInductor could not compile {path.name}: {first}") from exc
