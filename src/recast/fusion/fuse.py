"""`recast.fuse`: N models in, one verified bundle out.

    sources ─► opset ─► IR ─► inputs ─► dedup ─► cse ─► dead ─► horizontal ─► ONNX ─► onnxruntime
                                                                              optimization ─► bundle

The bundle (`kind: fused`) holds one graph whose outputs are `model/output`, and a manifest
with the usual checksums plus `fusion`: each model's inputs and outputs in the fused graph,
how to make inputs for it, and the report. It is written only if every model's outputs from
the fused graph equal the model's own (the parity gate), staged and renamed like an export.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import nullcontext
from pathlib import Path

import onnx

from ..atomic import atomic_directory, atomic_file
from ..errors import FusionError
from ..export.bundle import onnx_io
from ..export.optimize import op_counts, optimize
from ..export.portable import required_runtime, save_graph
from ..runtime.manifest import BUNDLE_FORMAT_VERSION, file_records, write_manifest
from ..runtime.session import Session
from ..version import __version__
from .graph import FusionGraph
from .parity import check_fused_parity
from .passes import GRAPH_PASSES, reconcile_opsets, run_passes
from .report import census, draw, sharing
from .sources import Source, load_source

log = logging.getLogger("recast")

# Token-id inputs are drawn below the row count of the table they index: (op, input slot) ->
# slot of that table.
ID_TABLES = {("Gather", 1): 0, ("EmbedLayerNormalization", 0): 2, ("EmbedLayerNormalization", 1): 4}


def fuse(
    models: dict,
    out: str | Path,
    *,
    shared_inputs: dict[str, list[str]] | None = None,
    target: str = "cpu",
    skip: tuple[str, ...] | list[str] = (),
    overwrite: bool = False,
    png: str | Path | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Fuse `models` ({name: ONNX file | bundle | checkpoint | {source, outputs} |
    TorchModel | (module, example_inputs)}) into one bundle at `out`. `shared_inputs`
    ({fused input: ["model/input", ...]}) replaces the default (inputs of one name, dtype and
    shape are one input); `skip` names passes not to run; `png` draws the fused DAG (a .png
    file, replaced only with `overwrite`)."""
    if len(models) < 2:
        raise FusionError("fusion needs at least two models")
    unknown = [p for p in skip if p not in GRAPH_PASSES]
    if unknown:
        raise FusionError(f"unknown pass {unknown[0]!r} in skip; passes: {', '.join(GRAPH_PASSES)}")
    if target not in ("cpu", "cuda"):
        raise FusionError(f"target must be cpu or cuda, got {target!r}")
    if target == "cuda":
        from ..export.optimize import cuda_usable

        if not cuda_usable():
            raise FusionError("target cuda needs a usable CUDA device here; fuse for cpu")
    out = Path(out)
    inputs = [path for path in map(_source_path, models.values()) if path is not None]
    # The drawing is renamed into place after the bundle, so a failed fusion leaves neither.
    drawing = nullcontext() if png is None else atomic_file(png, overwrite, suffix=".png")
    with (
        drawing as png_temp,
        atomic_directory(out, overwrite, inputs) as staging,
        tempfile.TemporaryDirectory() as tmp,
    ):
        work = Path(tmp)
        sources = {}
        for name, spec in models.items():
            log.info("reading model %s", name)
            sources[name] = load_source(name, spec, work, trust_pickle)
        graph, report = _fused_graph(sources, shared_inputs, skip)
        owners = graph.owners()
        report.update(sharing(owners))
        raw = work / "fused.onnx"
        onnx.save(graph.to_onnx(work / "fused.onnx.data"), str(raw))
        save_graph(raw, staging / "model.onnx")  # as fused: onnxruntime fuses it at session open
        log.info("counting the fused graph's ops after onnxruntime's optimization (%s)", target)
        optimize(raw, work / "optimized.onnx", target)
        report["optimized_ops"] = sum(op_counts(work / "optimized.onnx").values())
        fusion = _fusion_record(graph, sources, report)
        manifest = _manifest(staging, sources, fusion, target)
        write_manifest(staging, manifest)
        log.info("checking every model's outputs against the model alone")
        session = Session(staging, device=target, verify=False)
        manifest["parity"] = check_fused_parity(session, sources, fusion)
        write_manifest(staging, manifest)
        if png_temp is not None:
            draw(graph, owners, png_temp)
    return out


def _source_path(spec) -> Path | None:
    """The path a model spec reads (an input the output must not be written over), if any."""
    spec = spec.get("source") if isinstance(spec, dict) else spec
    return Path(spec).expanduser() if isinstance(spec, (str, Path)) else None


def _fused_graph(sources: dict[str, Source], shared_inputs, skip) -> tuple[FusionGraph, dict]:
    protos = {name: source.model for name, source in sources.items()}
    results = [reconcile_opsets(protos)]
    graph = FusionGraph()
    for name, source in sources.items():
        graph.add_model(name, protos[name], source.base)
        if source.outputs is not None:  # outputs not kept go; `dead` removes their work
            for output in [o for o in graph.outputs if o.startswith(f"{name}/")]:
                if output.split("/", 1)[1] not in source.outputs:
                    del graph.outputs[output]
                    del graph.output_info[output]
    before = census(graph)
    results += run_passes(graph, skip, shared_inputs=shared_inputs)
    graph.name_dims()
    shared = next((r.detail["shared"] for r in results if r.name == "inputs"), {})
    report = {
        "before": before,
        "after": census(graph),
        "passes": [vars(r) for r in results],
        "shared_inputs": shared,
    }
    return graph, report


def _fusion_record(graph: FusionGraph, sources: dict[str, Source], report: dict) -> dict:
    """The manifest's `fusion` section: per model its inputs and outputs in the fused graph;
    per fused input how to make values for it; the report."""
    renamed = {key: fused for fused, keys in report["shared_inputs"].items() for key in keys}
    models = {}
    for name, source in sources.items():
        inputs = [v.name for v in source.model.graph.input]
        weights = {t.name for t in source.model.graph.initializer}
        models[name] = {
            "source": source.origin,
            "inputs": {
                i: renamed.get(f"{name}/{i}", f"{name}/{i}") for i in inputs if i not in weights
            },
            "outputs": {
                out.split("/", 1)[1]: out for out in graph.outputs if out.startswith(f"{name}/")
            },
            "max_positions": source.max_positions,
        }
    dims = {}
    for source in sources.values():
        dims.update(source.dim_hints)
    return {
        "models": models,
        "inputs": [_input_record(graph, key) for key in graph.inputs],
        "dims": dims,
        "report": report,
    }


def _input_record(graph: FusionGraph, key: str) -> dict:
    tensor = graph.g.nodes[key]["info"].type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
    shape = [
        d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim
    ]
    if dtype.kind == "f":
        values = "normal"
    elif dtype.kind == "b" or "mask" in key:
        values = "ones"
    else:
        rows = [
            rows
            for op in graph.consumers(key)
            for slot, tensor_key in enumerate(graph.g.nodes[op]["inputs"])
            if tensor_key == key and (rows := _table_rows(graph, op, slot)) is not None
        ]
        # ids of a table: checked at run time; other integers: small example values only
        values = [0, int(min(rows))] if rows else "small"
    return {"name": key, "dtype": dtype.name, "shape": shape, "values": values}


def _table_rows(graph: FusionGraph, op: str, slot: int) -> int | None:
    """The rows of the constant table `op` indexes with its input `slot`, if it does."""
    d = graph.g.nodes[op]
    table_slot = ID_TABLES.get((d["op_type"], slot))
    if table_slot is None or table_slot >= len(d["inputs"]):
        return None
    table = graph.g.nodes.get(d["inputs"][table_slot], {})
    if table.get("role") != "initializer":
        return None
    dims = list(table["proto"].dims)
    axis = next((a.i for a in d["attrs"] if a.name == "axis"), 0)
    return dims[axis % len(dims)] if dims else None


def _manifest(staging: Path, sources: dict[str, Source], fusion: dict, target: str) -> dict:

    inputs, outputs = onnx_io(staging / "model.onnx")
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "recast_version": __version__,
        "artifact": "onnx",
        "kind": "fused",
        "source": ", ".join(f"{n}: {s.origin}" for n, s in sources.items()),
        "target": target,
        "precision": "fp32",
        "model": None,
        "routing": None,
        "graphs": {
            "model": {
                "file": "model.onnx",
                "inputs": inputs,
                "outputs": outputs,
                "requires": required_runtime(staging / "model.onnx"),
            }
        },
        "fusion": fusion,
        "files": file_records(staging),
        "parity": None,
    }
