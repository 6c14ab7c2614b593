"""The output format interface (mergekit `MoEOutputArchitecture` style) and its registry.

A format decides what MoE it can express (checked with the recipe), which dense models it is
written from (checked after loading, before any work), what the built MoE needs before
training so that it trains under the format's semantics, its files, and the check of the
written files. Adding a format is one module: an `OutputFormat` subclass decorated with
`@register_format`, imported by `recast/formats/__init__.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import transformers
from pydantic import field_validator
from torch import nn

from ..models.families import Family
from ..registry import Registry
from ..settings import Section, registered
from ..shards import DEFAULT_SHARD_SIZE, shard_bytes

SHARD_BYTES = shard_bytes(DEFAULT_SHARD_SIZE)


class OutputFormat:
    """One way to write a converted model; `name` is its `output.format`."""

    name: ClassVar[str]

    def cannot_express(
        self, *, router: str, router_options: dict, combine: str, shared: float
    ) -> str | None:
        """Why this format cannot hold the MoE a recipe with these settings builds (the
        recipe's error message), or None if it can. `router_options` are the router kind's
        own options as the recipe gives them."""
        return None

    def check_family(self, family: Family, config: transformers.PretrainedConfig) -> None:
        """Refuse (FormatError), before any work, a dense model this format is not written from."""

    def prepare(self, model: nn.Module) -> None:
        """Give the just-built MoE what the format computes, so that it is trained that way."""

    def write(
        self, model: nn.Module, directory: Path, tokenizer=None, shard_size: int = SHARD_BYTES
    ) -> None:
        """The format's files into an existing (staging) directory; weights above `shard_size`
        bytes are sharded."""
        raise NotImplementedError

    def check_written(
        self, model: nn.Module, directory: Path, sequences: list[list[int]], pad_id: int
    ) -> dict:
        """Compare the files written in `directory` with `model` on `sequences`; what the
        report records as `stock_check` ({}: nothing to compare). Raises ParityError."""
        return {}


FORMATS: Registry[OutputFormat] = Registry("output format")


def register_format(cls: type[OutputFormat]) -> type[OutputFormat]:
    """Class decorator: register one instance of the format under its `name`."""
    FORMATS.register(cls.name)(cls())
    return cls


class OutputSpec(Section):
    # recast: this package's format (any router); mixtral / qwen2_moe: stock transformers
    # formats that load without recast (per-layer linear gates, softmax combine).
    format: str = "recast"
    dir: str | None = None
    # safetensors files above this are split into numbered shards with an index
    shard_size: str | int = DEFAULT_SHARD_SIZE

    @field_validator("shard_size")
    @classmethod
    def _a_size(cls, size: str | int) -> str | int:
        shard_bytes(size)
        return size

    @field_validator("format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        return registered(FORMATS, name)
