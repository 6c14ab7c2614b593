"""The schema of `manifest.json`: what `recast export` and `recast fuse` write, with strict
types, so a manifest that does not fit is refused at load (one `BundleIntegrityError`) instead
of failing later as a KeyError or TypeError deep in the runtime.

Fields the runtime tests for presence (`"cache" in model`) are typed `X = None`: they may be
absent, but a `null` is refused. Keys not listed here are ignored (newer bundles may add some).
"""

from __future__ import annotations

from pathlib import PurePath, PurePosixPath
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


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


def _numpy_dtype(name: str) -> str:
    try:
        np.dtype(name)
    except TypeError:
        raise ValueError(f"{name!r} is not a numpy dtype") from None
    return name


Name = Annotated[str, AfterValidator(relative_name)]
DType = Annotated[str, AfterValidator(_numpy_dtype)]
Count = Annotated[int, Field(ge=0)]
Size = Annotated[int, Field(ge=1)]


class Record(BaseModel):
    model_config = ConfigDict(strict=True)


class FileRecord(Record):
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    size: Count


class Tensor(Record):
    name: str
    dtype: DType
    shape: list[int | str] | None


class Graph(Record):
    file: Name
    inputs: list[Tensor]
    outputs: list[Tensor]
    compiled: Name | None = None  # pt2 --compile: the AOTInductor package that runs instead
    quantization: dict | None = None


class Cache(Record):
    layers: Count
    heads: Size
    head_dim: Size


class Model(Record):
    family: str
    vocab_size: Size
    hidden_size: Size
    max_positions: Size | None
    eos_token_ids: list[Count]
    pad_token_id: Count
    cache: Cache = None  # decoders
    router_cache: Cache = None  # pre-gating decoders


class Router(Record, extra="allow"):
    kind: str


class Routing(Record):
    experts: Size
    top_k: Size
    combine: str
    router: Router
    pregate: bool
    offload: bool = False
    moe_op: str
    expert_widths: list[Count]
    expert_params: Count | None = None
    shared_widths: list[Count]


class Parity(Record):
    passed: bool
    precision: str
    tolerance: float
    metric: str
    max_error: float
    cases: list[dict]
    experts_exercised: float = None  # model bundles
    experts_never_chosen: list[list[int]] | None = None
    models: dict[str, float] = None  # fused bundles: each model's largest error


class Fit(Record):
    fixed_ms: float
    per_unit_ms: float


class ProfileCase(Record):
    batch: Count
    length: Count
    prefill_ms: float
    decode_step_ms: float | None = None
    memory_bytes: Count


class Profile(Record):
    machine: str
    providers: Annotated[list[str], Field(min_length=1)]
    resident_weight_bytes: Count
    expert_weight_bytes: Count
    kv_bytes_per_token: Count
    cases: list[ProfileCase]
    prefill_fit: Fit
    decode_fit: Fit = None  # decoders


class FusedModel(Record):
    source: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    max_positions: Size | None = None


class FusedInput(Record):
    name: str
    dtype: DType
    shape: list[int | str]
    # how example values are made: a kind, or the [low, high) rows of the table ids index
    values: (
        Literal["ones", "normal", "small"] | Annotated[list[int], Field(min_length=2, max_length=2)]
    )


class Census(Record):
    ops: Count
    initializer_bytes: Count
    initializers: Count
    ops_per_model: dict[str, Count]


class PassRecord(Record):
    name: str
    rewrites: Count
    detail: dict


class FusionReport(Record):
    before: Census
    after: Census
    passes: list[PassRecord]
    shared_inputs: dict[str, list[str]]
    optimized_ops: Count
    shared_ops: Count
    ops_by_models: dict[str, Count]


class Fusion(Record):
    models: Annotated[dict[str, FusedModel], Field(min_length=1)]
    inputs: list[FusedInput]
    dims: dict[str, int | str]
    report: FusionReport


class Manifest(Record):
    format_version: int
    recast_version: str
    artifact: Literal["onnx", "pt2"]
    kind: Literal["decoder", "encoder", "fused"]
    source: str
    target: Literal["cpu", "cuda"]
    precision: str
    export: dict | None = None
    model: Model | None
    routing: Routing | None = None
    graphs: dict[str, Graph]
    files: dict[Name, FileRecord]
    parity: Parity | None  # None only while the export runs its parity gate
    profile: Profile | None = None
    fusion: Fusion = None  # fused bundles

    @model_validator(mode="after")
    def _fits_its_kind(self) -> Manifest:
        if "model" not in self.graphs:
            raise ValueError("graphs has no 'model' graph")
        fused, model, parity = self.kind == "fused", self.model, self.parity
        lacking = {
            "fusion": fused and self.fusion is None,
            "artifact onnx": fused and self.artifact != "onnx",
            "parity.models": fused and parity is not None and parity.models is None,
            "model": not fused and model is None,
            "model.cache": self.kind == "decoder" and model is not None and model.cache is None,
            "model.router_cache": not fused
            and "router" in self.graphs
            and model is not None
            and model.router_cache is None,
            "parity.experts_exercised": not fused
            and parity is not None
            and parity.experts_exercised is None,
        }
        missing = [name for name, absent in lacking.items() if absent]
        if missing:
            raise ValueError(f"a {self.kind} bundle's manifest needs {missing[0]}")
        return self
