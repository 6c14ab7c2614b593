"""Fusion recipes (`recast fuse RECIPE`): which models, which inputs they share, the target.

name: tasks
models:
  sentiment: exported/sentiment-onnx            # an ONNX file, bundle or checkpoint
  topic: {source: exported/topic-onnx, outputs: [last_hidden_state]}
shared_inputs:                                  # optional; default: same name, dtype, shape
  input_ids: [sentiment/input_ids, topic/input_ids]
target: cpu
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..settings import Section, read_mapping, validated
from .passes import GRAPH_PASSES


class FusedModel(Section):
    source: str  # an .onnx file, a recast bundle, a checkpoint dir, package:<module> or hub id
    outputs: list[str] | None = None  # the outputs to keep (default: all)


class FusionRecipe(Section):
    name: str
    models: dict[str, str | FusedModel] = Field(min_length=2)
    # {fused input: ["model/input", ...]}; None: inputs of the same name, dtype and shape
    shared_inputs: dict[str, list[str]] | None = None
    target: Literal["cpu", "cuda"] = "cpu"
    skip: list[str] = []  # passes not to run
    dir: str | None = None  # the bundle's directory; default exported/<name>

    @field_validator("skip")
    @classmethod
    def _known_passes(cls, skip: list[str]) -> list[str]:
        unknown = [name for name in skip if name not in GRAPH_PASSES]
        if unknown:
            raise ValueError(f"unknown pass {unknown[0]!r}; passes: {', '.join(GRAPH_PASSES)}")
        return skip

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict) -> dict:
        bad = [name for name in models if "/" in name or not name]
        if bad:
            raise ValueError(f"model names are used as prefixes and cannot contain '/': {bad}")
        return models

    def entries(self) -> dict[str, str | dict]:
        return {
            name: spec if isinstance(spec, str) else spec.model_dump(exclude_none=True)
            for name, spec in self.models.items()
        }

    @property
    def out(self) -> Path:
        return Path(self.dir or f"exported/{self.name}")


def load_fusion_recipe(source: str | Path | dict) -> FusionRecipe:
    data, origin, text = read_mapping(source, "name, models, shared_inputs")
    return validated(FusionRecipe, data, origin, text)
