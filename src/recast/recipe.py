"""Recipes: YAML checked by pydantic (mergekit `MergeConfiguration` style).

Unknown keys are errors with a suggestion; every error names the field path and, when the
recipe came from a file, the YAML line. The resolved recipe is written next to each output.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .refactor.partition import STRATEGIES
from .registry import Registry, did_you_mean
from .routers.base import ROUTERS


def _registered(registry: Registry, name: str) -> str:
    """`name` if the registry knows it; a ValueError (so pydantic adds the field path) if not."""
    try:
        registry.get(name)
    except RecipeError as exc:
        raise ValueError(str(exc)) from None
    return name


def _check_options(
    schema: type[BaseModel], options: dict, owner: str, prefix: str = "", also_known: list[str] = ()
) -> None:
    """Validate a component's `options` against its schema; a ValueError (which pydantic
    places under the field path) names the key and suggests the closest known one."""
    # Option schemas are the components' own models: refuse non-finite numbers as Section does.
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{key}: Input should be a finite number for {owner}")
    try:
        schema(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        unknown = first["type"] == "extra_forbidden"
        hint = did_you_mean(key, [*also_known, *schema.model_fields]) if unknown else ""
        message = "unknown key" if unknown else first["msg"].removeprefix("Value error, ")
        where = f"{prefix}{key}: " if key else ""
        raise ValueError(
            f"{where}{message}{hint} for {owner} "
            f"(its options: {', '.join(schema.model_fields) or 'none'})"
        ) from None


class Section(BaseModel):
    # inf passes open ranges (lr > 0) and nan fails ranges with a misleading message
    # ("should be less than 1"): refuse both as not finite.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CalibrationSpec(Section):
    """Text streamed through the dense model to decide the partition."""

    data: str = "builtin:pydoc"
    domains: dict[str, str] | None = None
    samples: int = Field(256, gt=0)
    seq_len: int = Field(128, ge=2)
    batch_size: int = Field(8, gt=0)
    reservoir: int = Field(1024, ge=0)


class ExpertsSpec(Section):
    """How each FFN is split and combined."""

    count: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    shared: float = Field(0.0, ge=0.0, lt=1.0)
    strategy: str = "cluster"
    combine: Literal["sum", "softmax"] = "sum"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        return _registered(STRATEGIES, name)

    @model_validator(mode="after")
    def _consistent(self) -> ExpertsSpec:
        if self.top_k > self.count:
            raise ValueError(
                f"top_k ({self.top_k}) is larger than count ({self.count}); "
                f"lower experts.top_k or raise experts.count"
            )
        _check_options(
            STRATEGIES.get(self.strategy).options,
            self.options,
            owner=f"strategy {self.strategy!r}",
            prefix="options.",
        )
        return self


class RouterSpec(Section):
    """Which router picks the experts, its kind's settings, and how it is trained.

    Keys beyond the ones below are the kind's own options (e.g. `width` for `pregate`),
    checked against that kind's schema.
    """

    model_config = ConfigDict(extra="allow")

    kind: str = "oracle"
    steps: int = Field(200, ge=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, gt=0)
    soft_weight: float = Field(0.25, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)

    @field_validator("kind")
    @classmethod
    def _known_router(cls, kind: str) -> str:
        return _registered(ROUTERS, kind)

    @model_validator(mode="after")
    def _kind_options(self) -> RouterSpec:
        _check_options(
            ROUTERS.get(self.kind).Options,
            self.options,
            owner=f"router {self.kind!r}",
            also_known=list(RouterSpec.model_fields),
        )
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The kind's own options (the keys that are not common router settings)."""
        return dict(self.model_extra or {})


class LoraSpec(Section):
    """LoRA on the stacked expert tensors during expert rounds (merged back at the end)."""

    rank: int = Field(0, ge=0)  # 0: train the experts' full weights
    alpha: float = Field(16.0, gt=0)


class DistillSpec(Section):
    temperature: float = Field(1.0, gt=0)
    kl_weight: float = Field(1.0, ge=0)  # logit KL (LMs) or last-hidden MSE (encoders)
    hidden_weight: float = Field(0.0, ge=0)  # per-layer hidden-state MSE


class RecoverSpec(Section):
    """Distillation from the dense teacher in alternating expert / router rounds."""

    steps: int = Field(0, ge=0)  # per round; 0 skips recovery
    rounds: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_decay: float = Field(0.5, gt=0, le=1)
    batch_size: int = Field(8, gt=0)
    load_balance: float = Field(0.01, ge=0)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)


class EvaluateSpec(Section):
    """Held-out text on which the dense and MoE models are compared."""

    enabled: bool = True
    data: str = "builtin:pydoc"
    samples: int = Field(64, gt=0)
    seq_len: int | None = Field(None, ge=2)


class OutputSpec(Section):
    # recast: this package's format (any router); mixtral / qwen2_moe: stock transformers
    # formats that load without recast (per-layer linear gates, softmax combine).
    format: Literal["recast", "mixtral", "qwen2_moe"] = "recast"
    dir: str | None = None


class ExpertBitsSpec(Section):
    # EdgeMoE: each expert gets 4 or 8 bits (or stays fp32) by its calibration importance,
    # the most important first, so that all experts' weights fit in this many MiB.
    budget_mb: float = Field(gt=0)


class QuantizeSpec(Section):
    experts: ExpertBitsSpec


class ExportSpec(Section):
    """A bundle for a runtime: `recast export`, or a recipe's `export:` after `convert`."""

    format: Literal["onnx", "pt2"] = "onnx"
    target: Literal["cpu", "cuda"] = "cpu"  # cuda: fp16 weights, onnxruntime's CUDA provider
    # int8: dynamic quantization of every matmul weight; {experts: {budget_mb}}: per-expert
    # bitwidths under a size budget (the rest int8).
    quantize: Literal["int8"] | QuantizeSpec | None = None
    moe_op: Literal["auto", "gather", "contrib"] = "auto"  # auto: gather on cpu, contrib on cuda
    compile: bool = False  # pt2: also an AOTInductor package
    offload: bool = False  # also store each expert on its own (experts/), for expert caching
    dir: str | None = None  # default: <output dir>-<format>

    @field_validator("quantize", mode="wrap")
    @classmethod
    def _quantize_kind(cls, value, handler):
        # A mapping can only mean per-expert bitwidths: its errors, not "should be 'int8'".
        return QuantizeSpec.model_validate(value) if isinstance(value, dict) else handler(value)

    @model_validator(mode="after")
    def _consistent(self) -> ExportSpec:
        if self.quantize is not None and (self.format != "onnx" or self.target != "cpu"):
            raise ValueError("quantize is for format onnx with target cpu (cuda bundles are fp16)")
        if self.compile and self.format != "pt2":
            raise ValueError("compile makes an AOTInductor package: it needs format: pt2")
        if self.compile and self.target == "cuda":
            raise ValueError("compile builds CPU kernels from the CPU-traced program: target cpu")
        if self.format == "pt2" and self.moe_op != "auto":
            raise ValueError("moe_op chooses the ONNX lowering; pt2 programs keep recast's op")
        if self.offload and (self.format != "onnx" or self.quantize is not None):
            raise ValueError("offload is for fp32 onnx bundles (no quantize, no pt2)")
        if self.offload and self.resolved_moe_op == "contrib":
            raise ValueError("offload feeds experts one by one: it needs moe_op: gather")
        if isinstance(self.quantize, QuantizeSpec) and self.moe_op == "contrib":
            raise ValueError("per-expert bitwidths need moe_op: gather (one matmul per expert)")
        return self

    @property
    def resolved_moe_op(self) -> str:
        if self.moe_op != "auto":
            return self.moe_op
        return "contrib" if self.target == "cuda" else "gather"


class Recipe(Section):
    name: str
    model: str
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    experts: ExpertsSpec = Field(default_factory=ExpertsSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    recover: RecoverSpec = Field(default_factory=RecoverSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    export: ExportSpec | None = None
    seed: int = Field(0, ge=0, le=2**32 - 1)  # what torch and numpy seeding accept

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names the output dir)")
        return name

    @model_validator(mode="after")
    def _format_can_express_the_moe(self) -> Recipe:
        fmt = self.output.format
        if fmt == "recast":
            return self
        if self.router.kind != "layer" or self.router.options.get("hidden", 0):
            raise ValueError(
                f"output.format {fmt} routes each layer with a linear gate on its hidden state; "
                f"it cannot express router.kind {self.router.kind!r}"
                f"{' with an MLP gate' if self.router.kind == 'layer' else ''}: use router.kind: "
                f"layer (hidden: 0) or output.format: recast"
            )
        if self.experts.combine != "softmax":
            raise ValueError(
                f"output.format {fmt} weights experts by softmax: set experts.combine: softmax"
            )
        if fmt == "mixtral" and self.experts.shared:
            raise ValueError(
                "output.format mixtral has no shared expert: set experts.shared: 0 or use qwen2_moe"
            )
        if fmt == "qwen2_moe" and not self.experts.shared:
            raise ValueError(
                "output.format qwen2_moe always has a shared expert: set experts.shared above 0"
            )
        return self

    @model_validator(mode="after")
    def _reservoir_for_strategy(self) -> Recipe:
        chosen = STRATEGIES.get(self.experts.strategy)
        if (
            chosen.needs_reservoir(chosen.options(**self.experts.options))
            and self.calibration.reservoir < 2
        ):
            raise ValueError(
                f"strategy {self.experts.strategy!r} clusters sampled activations: "
                f"calibration.reservoir must be at least 2 (default 1024)"
            )
        return self

    @model_validator(mode="after")
    def _domains_match_experts(self) -> Recipe:
        if self.experts.strategy == "domain":
            domains = self.calibration.domains or {}
            if len(domains) < 2:
                raise ValueError(
                    "strategy 'domain' needs calibration.domains with at least two named sources"
                )
            if len(domains) != self.experts.count:
                raise ValueError(
                    f"strategy 'domain' makes one expert per domain: experts.count is "
                    f"{self.experts.count} but calibration.domains has {len(domains)}"
                )
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir else Path("exported") / self.name

    @property
    def text_sources(self) -> list[str]:
        """Every text source the recipe names, whether or not this run reads it."""
        domains = list((self.calibration.domains or {}).values())
        return list(dict.fromkeys([self.calibration.data, *domains, self.evaluate.data]))

    def check_positions(self, positions: int | None, calibrating: bool, evaluating: bool) -> None:
        """Refuse the sequence lengths a run uses beyond the model's `positions` (its
        max_position_embeddings): BERT fails on them, rotary models never saw them."""
        cal, ev = self.calibration, self.evaluate
        lengths = {"calibration.seq_len": cal.seq_len} if calibrating else {}
        if evaluating and ev.enabled:
            lengths["evaluate.seq_len" if ev.seq_len else "calibration.seq_len"] = (
                ev.seq_len or cal.seq_len
            )
        for key, length in lengths.items():
            if positions is not None and length > positions:
                raise RecipeError(
                    f"{key} is {length}, beyond the model's max_position_embeddings "
                    f"({positions}); set {key} to at most {positions}"
                )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides (values parsed as YAML scalars) to a recipe dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r} is not key=value (e.g. --set experts.count=4)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {key}: {part!r} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RecipeError(
                f"--set {key}: {raw!r} is not a valid YAML value ({getattr(exc, 'problem', exc)}); "
                f"give a YAML scalar or list such as 4, 0.5 or [a, b]"
            ) from None
    return data


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] = ()) -> Recipe:
    """A validated Recipe from a YAML path, a dict or a Recipe, with `--set` overrides applied."""
    if isinstance(source, Recipe):
        source = source.model_dump()
    data, origin, text = read_mapping(source, "name, model, experts")
    return validated(Recipe, apply_overrides(data, list(overrides)), origin, text)


def read_mapping(source: str | Path | dict, keys: str) -> tuple[dict, str, str | None]:
    """(data, origin, YAML text) of a recipe given as a dict or a YAML file; `keys` names
    some top-level keys for the error a non-mapping gets."""
    if isinstance(source, dict):
        return dict(source), "recipe", None
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError(
            f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of keys such as {keys}")
    return data, str(path), text


def validated(schema: type[BaseModel], data: dict, origin: str, text: str | None):
    """`schema` validated from `data`; RecipeError with the first error's path and line."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(exc, origin, text, schema)) from None


def export_spec(settings: ExportSpec | dict | None) -> ExportSpec:
    """Export settings checked like a recipe's `export:` section (RecipeError if invalid)."""
    if isinstance(settings, ExportSpec):
        return settings
    try:
        return ExportSpec.model_validate(settings or {})
    except ValidationError as exc:
        raise RecipeError(_describe(exc, "export settings", None, ExportSpec)) from None


def _describe(
    exc: ValidationError, origin: str, text: str | None, schema: type[BaseModel] = Recipe
) -> str:
    """One line for the first error: `file:line: path: message`, and how many more."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    path = "".join(f"{p}: " for p in [".".join(loc)] if p)
    line = _line_of(text, first["loc"]) if text else None
    where = f"{origin}:{line}" if line else origin
    if first["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1], schema)
        message = f"unknown key{did_you_mean(loc[-1], known)}; allowed here: {', '.join(known)}"
    else:
        message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {path}{message}{more}"


def _known_keys(parents: list[str], model: type[BaseModel]) -> list[str]:
    for part in parents:
        if part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _line_of(text: str, loc: tuple) -> int | None:
    """The 1-based YAML line of the key at `loc` (or of its deepest existing parent)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next((kv for kv in node.value if kv[0].value == str(part)), None)
        if match is None:
            break
        line = match[0].start_mark.line + 1
        node = match[1]
    return line
