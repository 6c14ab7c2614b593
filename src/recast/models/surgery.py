"""Reading a family's FFNs out of a model, swapping modules in place, and its state without
tied copies.

Surgery checks every layer before it mutates any (peft `inject_adapter` style): a model whose
layout does not match its family adapter is refused whole, never half converted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import ModelLoadError
from .families import Family


def layer_prefix(model: nn.Module, family: Family) -> str:
    """The tensor-name prefix of the layers (`model.layers.`, `transformer.h.`)."""
    layers = layer_modules(model, family)
    return next(n for n, m in model.named_modules() if m is layers) + "."


def layer_modules(model: nn.Module, family: Family) -> nn.ModuleList:
    """The backbone's list of transformer layers."""
    try:
        layers = model.base_model.get_submodule(family.layers)
    except AttributeError as exc:
        raise ModelLoadError(
            f"model has no {family.layers!r} layer list; it does not match the {family.name} family"
        ) from exc
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelLoadError(f"{family.layers!r} is not a non-empty list of layers")
    return layers


@dataclass
class DenseFFN:
    """One dense FFN's weights in `nn.Linear` orientation: rows of `up` are neurons."""

    up: Tensor  # [I, H]
    up_bias: Tensor | None  # [I]
    gate: Tensor | None  # [I, H]
    gate_bias: Tensor | None
    down: Tensor  # [H, I]
    down_bias: Tensor | None  # [H]

    @property
    def width(self) -> int:
        return self.up.shape[0]

    @property
    def hidden(self) -> int:
        return self.up.shape[1]


def _projection(
    layer: nn.Module, path: str, family: Family, index: int
) -> tuple[Tensor, Tensor | None]:
    try:
        module = layer.get_submodule(path)
    except AttributeError as exc:
        raise ModelLoadError(
            f"layer {index} has no {path!r} ({family.name} layout expected)"
        ) from exc
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ModelLoadError(f"layer {index}: {path!r} has no 2-D weight")
    weight = weight.detach()
    # Conv1D (GPT-2) stores [in, out]; nn.Linear stores [out, in].
    weight = weight.T if family.conv1d else weight
    bias = getattr(module, "bias", None)
    return weight, None if bias is None else bias.detach()


def dense_ffn(layer: nn.Module, family: Family, index: int) -> DenseFFN:
    """The FFN weights of one layer, checked for consistent shapes."""
    up, up_bias = _projection(layer, family.up, family, index)
    down, down_bias = _projection(layer, family.down, family, index)
    gate, gate_bias = (
        _projection(layer, family.gate, family, index) if family.gated else (None, None)
    )
    ffn = DenseFFN(up, up_bias, gate, gate_bias, down, down_bias)
    if down.shape != (ffn.hidden, ffn.width) or (gate is not None and gate.shape != up.shape):
        raise ModelLoadError(
            f"layer {index}: FFN shapes do not match (up {tuple(up.shape)}, down "
            f"{tuple(down.shape)}{'' if gate is None else f', gate {tuple(gate.shape)}'})"
        )
    return ffn


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def tied_weights(model: nn.Module) -> dict[str, str]:
    """Tied parameter names (e.g. `lm_head.weight` -> the embedding it shares), per transformers."""
    return getattr(model, "all_tied_weights_keys", None) or {}


def untied_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with tied copies dropped (loading re-ties them), as safetensors requires."""
    state = model.state_dict()
    for target, source in tied_weights(model).items():
        if (
            target in state
            and source in state
            and state[target].data_ptr() == state[source].data_ptr()
        ):
            del state[target]
    return {k: v.contiguous() for k, v in state.items()}
