"""Fused bundles at run time: one graph holding several models' outputs (`model/output`).

`FusedRunner` runs the whole graph in one onnxruntime session, or, for a subset of the models,
a session over just the part of the graph those models need (onnxruntime computes every node
of a graph whatever outputs are asked for, so a subset gets its own pruned graph; it reads the
same weight file). `example_feeds` makes inputs from the manifest's description of each input
(the parity gate's and `recast run --example`'s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from ..errors import RuntimeInputError
from .backends import OnnxGraph
from .manifest import bundle_file
from .onnx_proto import read_model

SIZES = [(1, 1), (2, 7), (3, 12)]  # per case: the sizes given to the 1st, 2nd, ... symbolic dim


class FusedRunner:
    def __init__(self, bundle: Path, manifest: dict, device: str | None, threads: int | None):
        self.device, self.threads = device, threads
        self.path = bundle_file(bundle, manifest["graphs"]["model"]["file"], manifest)
        self.fusion = manifest["fusion"]
        self.models = list(self.fusion["models"])
        self.graphs: dict[tuple[str, ...], OnnxGraph] = {}

    def outputs_of(self, models: list[str]) -> list[str]:
        unknown = [m for m in models if m not in self.models]
        if unknown or not models:
            raise RuntimeInputError(
                f"this fused bundle has no model {unknown[0] if unknown else '(none given)'!r}; "
                f"it holds {', '.join(self.models)}"
            )
        return [out for m in models for out in self.fusion["models"][m]["outputs"].values()]

    def graph(self, models: list[str] | None = None) -> OnnxGraph:
        """The session for `models` (all by default), opened on first use."""
        key = tuple(self.models if models is None else sorted(set(models)))
        if key not in self.graphs:
            if key == tuple(self.models):
                self.graphs[key] = OnnxGraph(self.path, self.device, self.threads)
            else:
                pruned = prune(read_model(self.path), self.outputs_of(key))
                self.graphs[key] = OnnxGraph(
                    pruned, self.device, self.threads, folder=self.path.parent
                )
        return self.graphs[key]


def prune(model: Message, outputs: list[str]) -> Message:
    """`model` (a ModelProto: `onnx_proto`'s, or onnx's own) reduced to the nodes, weights and
    inputs that `outputs` depend on; everything else about it (opsets, metadata, functions)
    stays as it was."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    needed, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None:
            stack.extend(t for t in node.input if t)
    wanted = {
        "node": lambda node: any(out in needed for out in node.output),
        "input": lambda value: value.name in needed,
        "output": lambda value: value.name in outputs,
        "value_info": lambda value: value.name in needed,
        "initializer": lambda tensor: tensor.name in needed,
        "sparse_initializer": lambda sparse: sparse.values.name in needed,
    }
    result = type(model)()
    result.CopyFrom(model)
    for field, keep in wanted.items():
        kept = getattr(result.graph, field)
        del kept[:]
        kept.extend(item for item in getattr(graph, field) if keep(item))
    return result


def example_feeds(inputs: list[dict], dims: dict, case: int = 1, seed: int = 0) -> dict:
    """Random inputs for a fused graph: case `case` of SIZES for its symbolic dims (in order of
    appearance; `dims` fixes some, e.g. a decoder's `past` to 0), token ids within the range of
    the table they index, masks of ones, floats from a standard normal."""
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    symbolic = [d for i in inputs for d in i["shape"] if isinstance(d, str)]
    for name in dict.fromkeys(symbolic):
        sizes[name] = SIZES[case][len(sizes) % len(SIZES[case])]
    for name in sizes:
        base = name.rsplit("/", 1)[-1]
        hint = dims.get(base)
        if isinstance(hint, int):
            sizes[name] = hint
        elif isinstance(hint, str):
            prefix = name[: len(name) - len(base)]
            sizes[name] = sizes.get(prefix + hint, sizes.get(hint, sizes[name]))
    feeds = {}
    for spec in inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in spec["shape"]]
        dtype, values = np.dtype(spec["dtype"]), spec["values"]
        if values == "ones":
            feeds[spec["name"]] = np.ones(shape, dtype)
        elif values == "normal":
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif values == "small":  # integers that index no table
            feeds[spec["name"]] = rng.integers(0, 2, shape).astype(dtype)
        else:
            feeds[spec["name"]] = rng.integers(values[0], values[1], shape).astype(dtype)
    return feeds


def check_ranges(inputs: list[dict], feeds: dict[str, np.ndarray]) -> None:
    """Token ids outside the table they index would read past it: a one-line error instead."""
    for spec in inputs:
        values, name = spec["values"], spec["name"]
        if not isinstance(values, list) or name not in feeds or not feeds[name].size:
            continue
        low, high = int(feeds[name].min()), int(feeds[name].max())
        if low < values[0] or high >= values[1]:
            bad = high if high >= values[1] else low
            raise RuntimeInputError(
                f"{name} holds {bad}, outside [{values[0]}, {values[1]}) (the rows of the table "
                "it indexes); use the model's tokenizer"
            )


def check_lengths(fusion: dict, models: list[str], feeds: dict[str, np.ndarray]) -> None:
    """A sequence longer than a model's position table fails deep inside onnxruntime: the
    lengths its bundle recorded are checked first (its mask spans the cache too, as in
    `Session`)."""
    for model in models:
        entry = fusion["models"][model]
        longest = entry.get("max_positions")  # absent from bundles fused before it was recorded
        for name in ("input_ids", "attention_mask"):
            fed = feeds.get(entry["inputs"].get(name))
            if longest and fed is not None and fed.shape[-1] > longest:
                raise RuntimeInputError(
                    f"{entry['inputs'][name]} spans {fed.shape[-1]} positions; model {model!r} "
                    f"takes at most {longest}; truncate the input"
                )


def describe(fusion: dict) -> list[str]:
    """`recast inspect` lines for a fused bundle's manifest section."""
    report = fusion["report"]
    before, after = report["before"], report["after"]
    lines = [
        "  models          "
        + ", ".join(
            f"{name} ({len(entry['outputs'])} outputs)" for name, entry in fusion["models"].items()
        ),
        "  shared inputs   "
        + (
            ", ".join(f"{k} <- {', '.join(v)}" for k, v in report["shared_inputs"].items())
            or "none"
        ),
        f"  ops             {before['ops']} separate -> {after['ops']} fused "
        f"({report['optimized_ops']} after onnxruntime optimization)",
        f"  weights         {_size(before['initializer_bytes'])} separate -> "
        f"{_size(after['initializer_bytes'])} fused",
        "  passes          " + ", ".join(f"{p['name']} {p['rewrites']}" for p in report["passes"]),
        f"  computed once   {report['shared_ops']} ops serve more than one model",
    ]
    for models, count in report["ops_by_models"].items():
        lines.append(f"    {models:<28} {count:>6} ops")
    return lines


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"
