"""A transformers model whose weights stay in the checkpoint until a stage asks for them.

The skeleton is built with accelerate's `init_empty_weights`: parameters on the meta device
(no memory), buffers real (rotary frequencies are computed, not stored). A stage loads one
module's tensors (`load`), uses it, and sends it back to meta (`free`), so memory holds one
decoder layer at a time. The model's own forward is still what runs: `record_layer_calls`
replaces the layers by recorders to capture the arguments each layer is called with (masks,
rotary embeddings: the same for every layer of a batch), and `final_outputs` feeds given hidden
states through whatever the model computes after its last layer (norm, head, pooler).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import accelerate
import torch
import transformers
from accelerate.utils import set_module_tensor_to_device
from torch import Tensor, nn

from ..errors import ModelLoadError
from ..logs import quiet
from ..shards import Checkpoint
from .families import Family
from .surgery import layer_modules, layer_prefix, tied_weights


@dataclass
class LayerCall:
    """The arguments one layer is called with besides its input hidden states."""

    args: tuple
    kwargs: dict


class _Recorded(Exception):
    """Raised by the last recorder: the model need not run its head."""


class _Recorder(nn.Module):
    """Stands for a layer: passes its input through, adding (input, call) to `calls`, which
    every layer's recorder shares, so it fills in layer order."""

    def __init__(self, calls: list[tuple[Tensor, LayerCall]], last: bool):
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        self.calls.append((hidden_states, LayerCall(args, kwargs)))
        if self.last:
            raise _Recorded
        return hidden_states


class _Replay(nn.Module):
    """Stands for the last layer: returns the given final hidden states."""

    def __init__(self, final: Tensor):
        super().__init__()
        self.final = final

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return self.final.to(hidden_states.dtype)


def _ignored_on_load(model: nn.Module) -> set[str]:
    """Patterns of stored tensors transformers' loader drops unread: the model's own, and the
    buffers older checkpoints saved that models now keep out of their state (transformers'
    `_adjust_missing_and_unexpected_keys`: MiniLM's checkpoint still has `position_ids`)."""
    patterns = set(model._keys_to_ignore_on_load_unexpected or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return patterns


class LazyModel:
    """The model of `config` with its tensors in `checkpoint`, loaded one module at a time."""

    def __init__(
        self, config: transformers.PretrainedConfig, family: Family, checkpoint: Checkpoint
    ):
        self.family, self.checkpoint = family, checkpoint
        auto = transformers.AutoModelForCausalLM if family.causal_lm else transformers.AutoModel
        with accelerate.init_empty_weights(), quiet("transformers"):
            self.model = auto.from_config(config, dtype=torch.float32)
        self.model.tie_weights()  # (on meta, from_config leaves a tied head separate)
        self.model.eval()
        self.layers = layer_modules(self.model, family)
        self.layer_prefix = layer_prefix(self.model, family)
        self._names = self._checkpoint_names()
        # the tensors outside the layers (embeddings, final norm, head), in checkpoint order
        self.outer_names = [n for n in self._names if not n.startswith(self.layer_prefix)]
        in_layers = sum(p.numel() for p in self.layers.parameters())
        self.dense_params = sum(p.numel() for p in self.model.parameters())
        self.outer_params = self.dense_params - in_layers

    def _checkpoint_names(self) -> dict[str, str]:
        """Model tensor name -> checkpoint name, every one present and none left over."""
        expected = [k for k in self.model.state_dict() if k not in tied_weights(self.model)]
        stored = set(self.checkpoint.names)
        prefix = f"{self.model.base_model_prefix}."
        names = {}
        for name in expected:
            candidates = (name, name.removeprefix(prefix))
            found = next((c for c in candidates if c in stored), None)
            if found is None:
                raise ModelLoadError(
                    f"{self.checkpoint.directory} lacks tensor {name}; the checkpoint is "
                    f"incomplete or not of the architecture its config.json names"
                )
            names[name] = found
        ignored = [re.compile(p) for p in _ignored_on_load(self.model)]
        extra = sorted(
            n for n in stored - set(names.values()) if not any(p.search(n) for p in ignored)
        )
        if extra:
            raise ModelLoadError(
                f"{self.checkpoint.directory} has an unknown tensor {extra[0]}; the checkpoint "
                f"is not of the architecture its config.json names"
            )
        return names

    def layer_names(self, index: int) -> list[str]:
        """The model tensor names of layer `index`."""
        prefix = f"{self.layer_prefix}{index}."
        return [n for n in self._names if n.startswith(prefix)]

    def stored(self, name: str):
        """Where tensor `name` lies in the checkpoint (to copy it through byte for byte)."""
        return self.checkpoint.stored[self._names[name]]

    def load(self, names: list[str], device: torch.device, dtype: torch.dtype) -> None:
        """Read `names` into the model on `device`, floating-point tensors cast to `dtype`."""
        for name in names:
            tensor = self.checkpoint.get(self._names[name])
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ModelLoadError(
                    f"tensor {name} of {self.checkpoint.directory} holds NaN or inf; fix or "
                    f"re-export the checkpoint"
                )
            try:
                set_module_tensor_to_device(self.model, name, device, value=tensor, dtype=dtype)
            except ValueError as exc:  # accelerate's shape check
                raise ModelLoadError(
                    f"tensor {name} of {self.checkpoint.directory} does not fit the model its "
                    f"config.json describes ({exc})"
                ) from exc
        if not set(names).isdisjoint(self.outer_names):
            self.model.tie_weights()

    @staticmethod
    def free(module: nn.Module) -> None:
        module.to("meta")

    def _names_of(self, module: nn.Module | None) -> set[str]:
        if module is None:
            return set()
        prefix = next(n for n, m in self.model.named_modules() if m is module)
        return {f"{prefix}.{n}" for n, _ in module.named_parameters()}

    @contextmanager
    def outer_modules(self, device: torch.device, dtype: torch.dtype, part: str):
        """The model with the outer tensors one `part` needs loaded, freed afterwards:
        `"input"` all but the head (for `record_layer_calls`), `"output"` all but the input
        embedding (for `final_outputs`; a head tied to it loads it all the same)."""
        if part == "input":
            unused = self.model.get_output_embeddings()
        else:
            unused = self.model.get_input_embeddings()
        skip = self._names_of(unused) - set(tied_weights(self.model).values())
        names = [n for n in self.outer_names if n not in skip]
        self.load(names, device, dtype)
        try:
            yield self.model
        finally:
            for name in names:
                set_module_tensor_to_device(self.model, name, "meta")
            self.model.tie_weights()  # a tied head still held the real embedding

    @contextmanager
    def _layers_replaced(self, modules: list[nn.Module]) -> Iterator[None]:
        saved = list(self.layers)
        try:
            for i, module in enumerate(modules):
                self.layers[i] = module
            yield
        finally:
            for i, module in enumerate(saved):
                self.layers[i] = module

    @torch.no_grad()
    def record_layer_calls(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, list[LayerCall]]:
        """(layer 0's input hidden states, each layer's other arguments) for one batch; the
        outer modules must be loaded."""
        calls: list[tuple[Tensor, LayerCall]] = []
        n = len(self.layers)
        with self._layers_replaced([_Recorder(calls, i == n - 1) for i in range(n)]):
            try:
                self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Recorded:
                pass
        return calls[0][0], [call for _, call in calls]

    @torch.no_grad()
    def final_outputs(self, ids: Tensor, mask: Tensor, final: Tensor):
        """The model's outputs for a batch whose last layer produced `final`."""
        n = len(self.layers)
        passes = [_Recorder([], False) for _ in range(n - 1)] + [_Replay(final)]
        # zeros in place of the embeddings, which are not loaded: the last layer replaces them
        embeds = torch.zeros(*ids.shape, self.model.config.hidden_size)
        with self._layers_replaced(passes):
            return self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)


def run_layer(layer: nn.Module, hidden: Tensor, call: LayerCall, device: torch.device) -> Tensor:
    """One layer's output for `hidden` with its recorded arguments, on `device`."""
    out = layer(hidden.to(device), *_to(call.args, device), **_to(call.kwargs, device))
    return out[0] if isinstance(out, tuple) else out


def _to(value, device: torch.device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
