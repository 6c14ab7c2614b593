"""The output format interface (mergekit `MoEOutputArchitecture` style) and its registry.

A format decides what MoE it can express (checked with the recipe), which dense models it is
written from (checked after loading, before any work), what the built MoE needs before
training so that it trains under the format's semantics, its files, and the check of the
written files. Adding a format is one module: an `OutputFormat` subclass decorated with
`@register_format`, imported by `recast/formats/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import transformers
from pydantic import field_validator
from torch import Tensor, nn

from ..evaluate.metrics import LMOutputs
from ..models.families import Family, family_for
from ..models.surgery import layer_prefix, tied_weights, untied_state
from ..refactor.info import MoEInfo, info_of
from ..refactor.moe import MoEFFN, moe_layers
from ..registry import Registry
from ..settings import Section, registered
from ..shards import DEFAULT_SHARD_SIZE, Source, shard_bytes

SHARD_BYTES = shard_bytes(DEFAULT_SHARD_SIZE)


@dataclass
class ModelFiles:
    """What a format writes of a converted model: the dense config it was converted from, its
    MoE layout, its tensors in the format's names (tensors or byte ranges of stored ones) and
    the tokenizer."""

    config: dict
    info: MoEInfo
    tensors: list[tuple[str, Source]]
    tokenizer: object = None


class OutputFormat:
    """One way to write a converted model; `name` is its `output.format`."""

    name: ClassVar[str]

    def cannot_express(
        self,
        *,
        router: str,
        router_options: dict,
        combine: str,
        shared: float,
        compensated: bool = False,
    ) -> str | None:
        """Why this format cannot hold the MoE a recipe with these settings builds (the
        recipe's error message), or None if it can. `router_options` are the router kind's
        own options as the recipe gives them."""
        return None

    def check_family(self, family: Family, config: transformers.PretrainedConfig) -> None:
        """Refuse (FormatError), before any work, a dense model this format is not written from."""

    # Qwen2-MoE's learned sigmoid gate on the shared expert (`MoEFFN.add_shared_gate`)
    shared_gate: ClassVar[bool] = False
    # whether the written files are loaded back and checked (`check_written`)
    checked: ClassVar[bool] = False

    def prepare(self, model: nn.Module) -> None:
        """Give the just-built MoE what the format computes, so that it is trained that way."""
        for moe in moe_layers(model):
            self.prepare_layer(moe)
        model.recast.shared_gate = self.shared_gate

    def prepare_layer(self, moe: MoEFFN) -> None:
        """`prepare` for one layer (a streamed conversion builds one at a time)."""
        if self.shared_gate:
            moe.add_shared_gate()

    def write(
        self, model: nn.Module, directory: Path, tokenizer=None, shard_size: int = SHARD_BYTES
    ) -> None:
        """The format's files into an existing (staging) directory; weights above `shard_size`
        bytes are sharded."""
        for moe in moe_layers(model):
            moe.bank.zero_padding()
        family = family_for(model.config.model_type)
        info = info_of(model)
        state = untied_state(model)
        prefix = layer_prefix(model, family)
        layers = [f"{prefix}{i}." for i in range(len(info.expert_widths))]
        tensors = self.outer_tensors(
            {k: v for k, v in state.items() if not k.startswith(tuple(layers))},
            tied_weights(model),
        )
        for prefix in layers:
            layer = {k: v for k, v in state.items() if k.startswith(prefix)}
            tensors.update(self.layer_tensors(layer, prefix, family, info))
        files = ModelFiles(model.config.to_dict(), info, list(tensors.items()), tokenizer)
        self.write_files(directory, files, shard_size)

    def outer_tensors(self, tensors: dict, tied: dict[str, str]) -> dict:
        """The tensors outside the layers (embeddings, final norm, head) as the format stores
        them; `tied` maps each tied tensor left out to the one it shares."""
        return tensors

    def layer_tensors(self, state: dict, prefix: str, family: Family, info: MoEInfo) -> dict:
        """One layer's tensors (recast's names, all under `prefix`, `model.layers.3.`) as the
        format stores them; of `info`'s widths only the largest counts."""
        return state

    def check_layout(self, info: MoEInfo) -> None:
        """Refuse (FormatError) a model whose layers, written one by one with `layer_tensors`,
        do not fit one config together."""

    def check_offloaded(
        self,
        directory: Path,
        info: MoEInfo,
        batches: list[tuple[Tensor, Tensor]],
        ours: LMOutputs,
        memory: int,
        offload: Path,
        dtype: torch.dtype,
    ) -> dict:
        """`check_written` for a model too big to hold: the files in `directory`, loaded with at
        most `memory` bytes of weights in memory (the rest offloaded to `offload`), against the
        converted model's log-probabilities `ours` on `batches` (input ids, attention mask);
        the weights are stored in `dtype`. What the report records as `stock_check`."""
        return {}

    def write_files(self, directory: Path, files: ModelFiles, shard_size: int = SHARD_BYTES):
        """`files` into `directory`, weights above `shard_size` bytes sharded."""
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
