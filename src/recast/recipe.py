"""Recipes: YAML checked by pydantic (mergekit `MergeConfiguration` style).

Each section is the settings its stage takes, defined beside the stage (`CalibrationSpec` in
refactor/calibrate.py, `RouterSpec` in routers/train.py, ...); the Recipe composes them and
checks what spans sections. Unknown keys are errors with a suggestion; every error names the
field path and, when the recipe came from a file, the YAML line. The resolved recipe is written
next to each output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from .errors import RecipeError
from .evaluate import EvaluateSpec
from .export.settings import ExportSpec
from .formats import FORMATS, OutputSpec
from .recover import RecoverSpec
from .refactor.calibrate import CalibrationSpec
from .refactor.compensate import CompensateSpec
from .refactor.partition import ExpertsSpec
from .routers.train import RouterSpec
from .settings import Section, read_mapping, validated
from .stream.settings import StreamSpec


class Recipe(Section):
    name: str
    model: str
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    experts: ExpertsSpec = Field(default_factory=ExpertsSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    compensate: CompensateSpec = Field(default_factory=CompensateSpec)
    recover: RecoverSpec = Field(default_factory=RecoverSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    export: ExportSpec | None = None
    stream: StreamSpec = Field(default_factory=StreamSpec)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # what torch and numpy seeding accept

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names the output dir)")
        return name

    @model_validator(mode="after")
    def _format_can_express_the_moe(self) -> Recipe:
        refusal = FORMATS.get(self.output.format).cannot_express(
            router=self.router.kind,
            router_options=self.router.options,
            combine=self.experts.combine,
            shared=self.experts.shared,
            compensated=self.compensate.enabled,
        )
        if refusal is not None:
            raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _reservoir_for_strategy(self) -> Recipe:
        if self.experts.needs_reservoir and self.calibration.reservoir < 2:
            raise ValueError(
                f"strategy {self.experts.strategy!r} clusters sampled activations: "
                f"calibration.reservoir must be at least 2 (default 1024)"
            )
        return self

    @model_validator(mode="after")
    def _one_shared_width_for_qwen2_moe(self) -> Recipe:
        if self.experts.budgeted_shared_widths and self.output.format == "qwen2_moe":
            raise ValueError(
                "output.format qwen2_moe has one shared expert width for every layer: set "
                "experts.options.shared_widths: fixed (or output.format: recast)"
            )
        return self

    @model_validator(mode="after")
    def _ranking_for_analytic_router(self) -> Recipe:
        if self.router.kind == "analytic" and self.experts.strategy != "activation_rate":
            raise ValueError(
                f"router.kind analytic scores experts by their representative neurons, which "
                f"strategy {self.experts.strategy!r} does not rank: set experts.strategy: "
                f"activation_rate"
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


def apply_overrides(data: dict, overrides: Iterable[str] | Mapping[str, Any]) -> dict:
    """Apply overrides to a recipe dict, in order: `key.sub=value` strings (`--set`; values
    parsed as YAML) or a mapping of dotted keys to values."""
    if isinstance(overrides, Mapping):
        pairs = overrides.items()
    else:
        pairs = (_parsed_override(item) for item in overrides)
    for key, value in pairs:
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"{key}: {part!r} is not a section")
            node = child
        node[leaf] = value
    return data


def _parsed_override(item: str) -> tuple[str, Any]:
    """(key, value) of a `--set key=value` override."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {item!r} is not key=value (e.g. --set experts.count=4)")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"--set {key}: {raw!r} is not a valid YAML value ({getattr(exc, 'problem', exc)}); "
            f"give a YAML scalar or list such as 4, 0.5 or [a, b]"
        ) from None


def load_recipe(
    source: str | Path | dict | Recipe,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    *,
    defaults: Mapping[str, Any] | None = None,
) -> Recipe:
    """A validated Recipe from a YAML path, a dict or a Recipe, with overrides applied
    (`--set` strings or {dotted.key: value}, see `apply_overrides`); `defaults` gives
    top-level keys the source may leave out."""
    if isinstance(source, Recipe):
        source = source.model_dump()
    data, origin, text = read_mapping(source, "name, model, experts")
    data = {**(defaults or {}), **data}
    return validated(Recipe, apply_overrides(data, overrides), origin, text)
