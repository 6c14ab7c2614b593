"""recast's custom torch ops: what its MoE layer becomes under `torch.export`.

Tracing the eager MoE layer would bake in the experts the example tokens happened to use (its
loop runs over the experts present in the batch), so under export the layer calls one of these
ops; each ONNX target lowers them its own way (`recast.export.lowerings`), and pt2 programs
keep them and run the eager implementations below.

Torch only: a process that runs pt2 bundles imports this module to register the ops, and
nothing of the converter (activations are torch's, formula for formula as transformers
writes them, so the ops compute what the eager layer computes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def slice_activations(
    x: Tensor,
    up: Tensor,
    gate: Tensor | None,
    up_bias: Tensor | None,
    gate_bias: Tensor | None,
    act,
) -> Tensor:
    """`act(gate(x)) * up(x)` (SwiGLU) or `act(up(x))`: one FFN slice's intermediate values."""
    h = nn.functional.linear(x, up, up_bias)
    if gate is None:
        return act(h)
    return act(nn.functional.linear(x, gate, gate_bias)) * h


def _gelu_tanh(x: Tensor) -> Tensor:
    # transformers' NewGELUActivation (GPT-2's gelu_new), written the same way
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
    return 0.5 * x * (1.0 + torch.tanh(inner))


ACTIVATIONS = {
    "silu": nn.functional.silu,
    "swish": nn.functional.silu,
    "relu": nn.functional.relu,
    "gelu": nn.functional.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
}


def activation_fn(name: str):
    """The torch function of a family's activation name (the ones recast's families use)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise NotImplementedError(
            f"activation {name!r} has no recast op implementation (known: {', '.join(ACTIVATIONS)})"
        ) from None


@torch.library.custom_op("recast::routed_experts", mutates_args=())
def routed_experts(
    x: Tensor,
    indices: Tensor,
    weights: Tensor | None,
    up: Tensor,
    gate: Tensor | None,
    down: Tensor,
    up_bias: Tensor | None,
    gate_bias: Tensor | None,
    activation: str,
) -> Tensor:
    """Sum over each token's chosen experts (`indices[T, k]`) of `weight * expert(x)`
    (`weights` None: of `expert(x)`)."""
    act = activation_fn(activation)
    out = torch.zeros_like(x)
    for expert in range(up.shape[0]):
        token, slot = (indices == expert).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        h = slice_activations(
            x[token],
            up[expert],
            None if gate is None else gate[expert],
            None if up_bias is None else up_bias[expert],
            None if gate_bias is None else gate_bias[expert],
            act,
        )
        y = torch.nn.functional.linear(h, down[expert])
        out.index_add_(0, token, y if weights is None else y * weights[token, slot, None])
    return out


@routed_experts.register_fake
def _(x, indices, weights, up, gate, down, up_bias, gate_bias, activation):
    return torch.empty_like(x)


@torch.library.custom_op("recast::routed_expert_list", mutates_args=())
def routed_expert_list(
    x: Tensor,
    indices: Tensor,
    weights: Tensor | None,
    fc1: list[Tensor],
    fc2: list[Tensor],
    activation: str,
    gated: bool,
) -> Tensor:
    """`routed_experts` with one `[H, (2 x) W]` / `[W, H]` weight pair per expert (offload)."""
    act = activation_fn(activation)
    out = torch.zeros_like(x)
    for expert, (first, second) in enumerate(zip(fc1, fc2, strict=True)):
        token, slot = (indices == expert).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token] @ first
        if gated:
            g, u = h.chunk(2, dim=-1)
            h = act(g) * u
        else:
            h = act(h)
        y = h @ second
        out.index_add_(0, token, y if weights is None else y * weights[token, slot, None])
    return out


@routed_expert_list.register_fake
def _(x, indices, weights, fc1, fc2, activation, gated):
    return torch.empty_like(x)
