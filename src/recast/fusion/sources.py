"""What can be fused: ONNX files, recast bundles, checkpoints and in-memory torch modules.

Each becomes a `Source`: its ONNX graph (weights left in their external data files until the
fused model is written), and a `reference` that runs the model alone — the parity gate compares
the fused graph's outputs with it.

- an `.onnx` file: the graph itself; the reference is an onnxruntime session on the file;
- a recast bundle (one `model` graph): its graph; the reference is recast's runtime on it;
- a checkpoint (a directory, `package:<module>` or a hub id): exported with `recast.export`
  first (its own parity gate against the torch model), then as a bundle;
- `TorchModel(module, example_inputs)` (or a `(module, example_inputs)` tuple): exported with
  torch.onnx; the reference is the module itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import FusionError
from ..runtime.manifest import MANIFEST

# Recast decoder bundles take a KV cache: the parity gate runs them from an empty one, where
# the mask spans just the new tokens.
DECODER_DIMS = {"past": 0, "total": "sequence"}


@dataclass
class TorchModel:
    """An in-memory module to fuse: `example_inputs` (a tensor or a tuple of them) trace it;
    every input's first axis is a dynamic `batch` unless `dynamic_axes` ({input name: {axis:
    dim name}}) says otherwise, so example inputs need sizes of at least 2 on dynamic axes."""

    module: object
    example_inputs: object
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    dynamic_axes: dict[str, dict[int, str]] | None = None


@dataclass
class Source:
    name: str
    model: onnx.ModelProto
    base: Path | None  # where its external data lives
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    origin: str
    dim_hints: dict = field(default_factory=dict)
    outputs: list[str] | None = None  # the outputs to keep (None: all)
    max_positions: int | None = None  # a bundle's longest sequence, checked at run time


def load_source(name: str, spec, work: Path, trust_pickle: bool = False) -> Source:
    """`spec` is a path string, `{"source": ..., "outputs": [...]}`, a TorchModel or a tuple."""
    if "/" in name or not name:
        raise FusionError(f"model name {name!r} must be non-empty and without '/'")
    outputs = None
    if isinstance(spec, dict):
        unknown = set(spec) - {"source", "outputs"}
        if unknown or "source" not in spec:
            raise FusionError(
                f"model {name!r}: give a path or {{source: PATH, outputs: [...]}}, got keys "
                f"{sorted(spec)}"
            )
        spec, outputs = spec["source"], spec.get("outputs")
    if isinstance(spec, tuple):
        spec = TorchModel(*spec)
    if isinstance(spec, TorchModel):
        source = _torch_source(name, spec, work)
    elif isinstance(spec, (str, Path)):
        source = _path_source(name, str(spec), work, trust_pickle)
    else:
        raise FusionError(
            f"model {name!r}: {type(spec).__name__} is not fusable; give an ONNX file, a bundle, "
            "a checkpoint, or TorchModel(module, example_inputs)"
        )
    source.outputs = outputs
    _check_outputs(source)
    return source


def _check_outputs(source: Source) -> None:
    names = [o.name for o in source.model.graph.output]
    if source.outputs is None:
        return
    unknown = [o for o in source.outputs if o not in names]
    if unknown or not source.outputs:
        raise FusionError(
            f"model {source.name!r} has no output {unknown[0] if unknown else '(none listed)'}; "
            f"its outputs are {', '.join(names)}"
        )


def _path_source(name: str, spec: str, work: Path, trust_pickle: bool) -> Source:
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        return _onnx_source(name, path)
    if (path / MANIFEST).is_file():
        return _bundle_source(name, path, spec)
    if path.is_file():
        raise FusionError(f"model {name!r}: {spec} is not an .onnx file")
    from ..errors import ModelLoadError
    from ..export import export

    try:
        bundle = export(spec, work / name, trust_pickle=trust_pickle)
    except ModelLoadError as exc:
        raise FusionError(
            f"model {name!r}: {exc} (fuse takes ONNX files, recast bundles and checkpoints)"
        ) from exc
    return _bundle_source(name, bundle, spec)


def _onnx_source(name: str, path: Path) -> Source:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and OSErrors
        raise FusionError(f"model {name!r}: {path} is not a readable ONNX model ({exc})") from exc
    from ..runtime.backends import OnnxGraph

    return Source(name, model, path.parent, _lazily(lambda: OnnxGraph(path, "cpu")), str(path))


def _bundle_source(name: str, bundle: Path, origin: str) -> Source:
    from ..runtime.manifest import read_manifest
    from ..runtime.session import Session

    manifest = read_manifest(bundle)  # checksums verified here, once
    graphs = manifest["graphs"]
    if manifest["artifact"] != "onnx" or list(graphs) != ["model"]:
        raise FusionError(
            f"model {name!r}: {bundle} is a {manifest['artifact']} bundle with graphs "
            f"{list(graphs)}; fusion takes ONNX bundles with one model graph (no pre-gating "
            "router)"
        )
    model = onnx.load(str(bundle / graphs["model"]["file"]), load_external_data=False)
    hints = DECODER_DIMS if manifest["kind"] == "decoder" else {}
    reference = _lazily(lambda: Session(bundle, device="cpu", verify=False))
    longest = (manifest["model"] or {}).get("max_positions")  # a fused bundle has no model
    return Source(name, model, bundle, reference, origin, hints, max_positions=longest)


def _lazily(open_session: Callable) -> Callable[[dict], dict]:
    """A reference that opens its session when the parity gate first runs it, not while the
    sources are read (so the models are not all held in memory during the passes)."""
    session = None

    def reference(feeds):
        nonlocal session
        if session is None:
            session = open_session()
        return session.run(feeds)

    return reference


def _torch_source(name: str, spec: TorchModel, work: Path) -> Source:
    import torch
    from torch.export import Dim

    from ..export.graphs import Traceable
    from ..export.onnx import export_onnx

    args = spec.example_inputs
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    module = spec.module.eval()
    input_names = spec.input_names or [f"input_{i}" for i in range(len(args))]
    with torch.no_grad():
        example_out = module(*args)
    flat = example_out if isinstance(example_out, (tuple, list)) else (example_out,)
    output_names = spec.output_names or [f"output_{i}" for i in range(len(flat))]
    if len(input_names) != len(args) or len(output_names) != len(flat):
        raise FusionError(
            f"model {name!r}: {len(input_names)} input names for {len(args)} example inputs, "
            f"{len(output_names)} output names for {len(flat)} outputs"
        )
    axes = spec.dynamic_axes or {n: {0: "batch"} for n in input_names}
    dims = {d: Dim(d) for per_input in axes.values() for d in per_input.values()}
    dynamic = {  # positional: export_onnx passes the values in argument order
        n: {axis: dims[d] for axis, d in axes.get(n, {}).items()} or None for n in input_names
    }
    traceable = Traceable(module, args, input_names, output_names, dynamic, axes)
    path = export_onnx(traceable, work / f"{name}.onnx", moe_op="gather")
    model = onnx.load(str(path), load_external_data=False)

    @torch.no_grad()
    def reference(feeds):
        out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().numpy() for n, o in zip(output_names, out, strict=True)}

    return Source(name, model, path.parent, reference, f"<in-memory {type(module).__name__}>")
