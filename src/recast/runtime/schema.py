"""The schema of `manifest.json`: what `recast export` and `recast fuse` write, with strict
types, so a manifest that does not fit is refused at load (one `BundleIntegrityError`) instead
of failing later as a KeyError or TypeError deep in the runtime.

Each record is the TypedDict of the dict the runtime reads (checked by `typed_json`). Fields
the runtime tests for presence (`"cache" in model`) are `NotRequired[X]`: they may be absent,
but a `null` is refused. Keys not listed here are ignored (newer bundles may add some).
"""

from pathlib import PurePath, PurePosixPath
from typing import Annotated, Literal, NotRequired, TypedDict

import numpy as np

from .typed_json import Mismatch, at_least, conform, length, matches


def relative_name(name: str) -> str:
    """`name` if it is a plain relative path (no `..`, not absolute, no NUL): a name that can
    only mean a file inside the bundle (symlinks are checked where files are opened)."""
    parts = PurePath(name).parts
    if (
        not parts
        or "\x00" in name
        or PurePath(name).anchor
        or PurePosixPath(name).is_absolute()
        or ".." in parts
    ):
        raise ValueError(f"{name!r} is not a relative path inside the bundle")
    return name


def _numpy_dtype(name: str) -> None:
    try:
        np.dtype(name)
    except (TypeError, ValueError, SyntaxError):  # numpy parses "a,b" as Python: ","
        raise ValueError(f"{name!r} is not a numpy dtype") from None


Name = Annotated[str, relative_name]
DType = Annotated[str, _numpy_dtype]
Count = Annotated[int, at_least(0)]
Size = Annotated[int, at_least(1)]


class FileRecord(TypedDict):
    sha256: Annotated[str, matches("^[0-9a-f]{64}$")]
    size: Count


class Tensor(TypedDict):
    name: str
    dtype: DType
    shape: list[int | str] | None


class Graph(TypedDict):
    file: Name
    inputs: list[Tensor]
    outputs: list[Tensor]
    compiled: NotRequired[Name | None]  # pt2 --compile: the AOTInductor package that runs instead
    quantization: NotRequired[dict | None]
    # ONNX graphs: "onnx" (standard operators only) or "onnxruntime" (com.microsoft kernels)
    requires: NotRequired[Literal["onnx", "onnxruntime"]]
    fusions: NotRequired[dict[str, Count]]  # graph: fused: onnxruntime's fused operators by kind


class Cache(TypedDict):
    layers: Count
    heads: Size
    head_dim: Size


class Model(TypedDict):
    family: str
    vocab_size: Size
    hidden_size: Size
    max_positions: Size | None
    eos_token_ids: list[Count]
    pad_token_id: Count
    cache: NotRequired[Cache]  # decoders
    router_cache: NotRequired[Cache]  # pre-gating decoders


class Router(TypedDict):
    kind: str  # the other keys are the router's own settings, kept as they are


class Routing(TypedDict):
    experts: Size
    top_k: Size
    combine: str
    router: Router
    pregate: bool
    offload: NotRequired[bool]
    moe_op: str
    expert_widths: list[Count]
    expert_params: NotRequired[Count | None]
    shared_widths: list[Count]


class Parity(TypedDict):
    passed: bool
    precision: str
    tolerance: float
    metric: str
    max_error: float
    cases: list[dict]
    experts_exercised: NotRequired[float]  # model bundles
    experts_never_chosen: NotRequired[list[list[int]] | None]
    coverage_bounded: NotRequired[bool]  # coverage batches ended by the gate's compute bound
    tokens: NotRequired[Count]  # tokens the gate ran (cached steps aside)
    models: NotRequired[dict[str, float]]  # fused bundles: each model's largest error


class Fit(TypedDict):
    fixed_ms: float
    per_unit_ms: float


class ProfileCase(TypedDict):
    batch: Count
    length: Count
    prefill_ms: float
    decode_step_ms: NotRequired[float | None]
    memory_bytes: Count


class Profile(TypedDict):
    machine: str
    providers: Annotated[list[str], length(1)]
    resident_weight_bytes: Count
    expert_weight_bytes: Count
    kv_bytes_per_token: Count
    cases: list[ProfileCase]
    prefill_fit: Fit
    decode_fit: NotRequired[Fit]  # decoders


class FusedModel(TypedDict):
    source: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    max_positions: NotRequired[Size | None]


class FusedInput(TypedDict):
    name: str
    dtype: DType
    shape: list[int | str]
    # how example values are made: a kind, or the [low, high) rows of the table ids index
    values: Literal["ones", "normal", "small"] | Annotated[list[int], length(2, 2)]


class Census(TypedDict):
    ops: Count
    initializer_bytes: Count
    initializers: Count
    ops_per_model: dict[str, Count]


class PassRecord(TypedDict):
    name: str
    rewrites: Count
    detail: dict


class FusionReport(TypedDict):
    before: Census
    after: Census
    passes: list[PassRecord]
    shared_inputs: dict[str, list[str]]
    optimized_ops: Count
    shared_ops: Count
    ops_by_models: dict[str, Count]


class Fusion(TypedDict):
    models: Annotated[dict[str, FusedModel], length(1)]
    inputs: list[FusedInput]
    dims: dict[str, int | str]
    report: FusionReport


class Manifest(TypedDict):
    format_version: int
    recast_version: str
    artifact: Literal["onnx", "pt2"]
    kind: Literal["decoder", "encoder", "fused"]
    source: str
    target: Literal["cpu", "cuda"]
    precision: str
    export: NotRequired[dict | None]
    model: Model | None
    routing: NotRequired[Routing | None]
    graphs: dict[str, Graph]
    files: dict[Name, FileRecord]
    parity: Parity | None  # None only while the export runs its parity gate
    profile: NotRequired[Profile | None]
    fusion: NotRequired[Fusion]  # fused bundles


def check_manifest(manifest: object) -> None:
    """Raise `Mismatch` (a ValueError naming the field) unless `manifest` fits the schema."""
    conform(manifest, Manifest)
    _fits_its_kind(manifest)


def _fits_its_kind(manifest: Manifest) -> None:
    """The sections a manifest's kind needs, beyond what each field's type says."""
    graphs, kind = manifest["graphs"], manifest["kind"]
    if "model" not in graphs:
        raise Mismatch("graphs has no 'model' graph")
    fused, model, parity = kind == "fused", manifest["model"], manifest["parity"]
    lacking = {
        "fusion": fused and "fusion" not in manifest,
        "artifact onnx": fused and manifest["artifact"] != "onnx",
        "parity.models": fused and parity is not None and "models" not in parity,
        "model": not fused and model is None,
        "model.cache": kind == "decoder" and model is not None and "cache" not in model,
        "model.router_cache": not fused
        and "router" in graphs
        and model is not None
        and "router_cache" not in model,
        "parity.experts_exercised": not fused
        and parity is not None
        and "experts_exercised" not in parity,
    }
    missing = [name for name, absent in lacking.items() if absent]
    if missing:
        raise Mismatch(f"a {kind} bundle's manifest needs {missing[0]}")
