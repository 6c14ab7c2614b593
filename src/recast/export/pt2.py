"""pt2 artifacts: a `torch.export` program (`torch.export.save`), optionally AOTInductor-compiled.

The MoE layer stays one `recast::routed_experts` op, so loading a pt2 bundle needs torch and
recast (the runtime imports `recast.ops` to register the op).

Tracing takes transformers' branches for a multi-token query (e.g. building a causal mask),
and torch.export guards the sequence length against 1 accordingly; those branches are also
right for one token (the ONNX graphs, traced the same way, run them at every length), so the
runtime loads programs with `check_guards=False` and the parity gate checks prefill (1 and
more tokens) and single-token decode steps.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export.dynamic_shapes import Dim
from torch.utils import _pytree as pytree

from .. import ops  # noqa: F401  registers recast::routed_experts for torch.export
from ..errors import ExportError
from .graphs import Traceable


def export_pt2(traceable: Traceable, path: Path, compile: bool = False) -> Path | None:
    """Save the program at `path`; with `compile`, also an AOTInductor package beside it,
    whose path is returned (the runtime then runs that one)."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            # Sizes 0 and 1 are ordinary sizes here (a prefill has no past, a decode step one
            # token), not cases to specialise on.
            with fx_config.patch(backed_size_oblivious=True):
                flat = FlatSignature(traceable)
                program = torch.export.export(
                    flat, flat.args, dynamic_shapes=(flat.dynamic_shapes,), strict=False
                )
    except Exception as exc:  # torch.export raises many types; keep the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"torch.export could not export {path.stem}: {first}") from exc
    torch.export.save(program, str(path))
    if compile:
        compiled = path.with_suffix(".aoti.pt2")
        _aot_compile(program, compiled)
        return compiled
    return None


def _is_leaf(value) -> bool:
    return value is None or isinstance(value, dict)


class FlatSignature(nn.Module):
    """The traced module called with its tensors as positional arguments, in the graph's input
    order, returning its outputs flattened: the saved program's signature is then exactly the
    bundle's input and output lists (absent optional inputs, e.g. expert ids of models that
    route inside their layers, are not arguments at all)."""

    def __init__(self, traceable: Traceable):
        super().__init__()
        self.module = traceable.module
        leaves, self.spec = pytree.tree_flatten(traceable.args, is_leaf=lambda v: v is None)
        self.present = [leaf is not None for leaf in leaves]
        self.args = tuple(leaf for leaf in leaves if leaf is not None)
        axes = pytree.tree_flatten(list(traceable.dynamic_shapes.values()), is_leaf=_is_leaf)[0]
        # Dim.DYNAMIC lets torch.export narrow a range (e.g. batch != 1 in a branch of
        # nn.MultiheadAttention) instead of failing; see the module note on guards.
        self.dynamic_shapes = tuple(
            {axis: Dim.DYNAMIC for axis in dims}
            for dims, present in zip(axes, self.present, strict=True)
            if present
        )

    def forward(self, *tensors):
        given = iter(tensors)
        leaves = [next(given) if present else None for present in self.present]
        return tuple(pytree.tree_leaves(self.module(*pytree.tree_unflatten(leaves, self.spec))))


def _aot_compile(program, path: Path) -> None:
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:  # no compiler, unsupported op: inductor raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"AOTInductor could not compile {path.name}: {first}") from exc
