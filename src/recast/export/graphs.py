"""The modules that get exported: a model's backbone and, for pre-gating models, its router.

Each wraps a transformers model into a forward with plain tensors in and out, so the graph's
inputs and outputs have stable names a runtime can rely on:

- `RouterGraph` (pre-gating models): `input_ids` -> `expert_indices [B, T, k]`,
  `expert_weights [B, T, k]`. A runtime routes a whole batch with it before the backbone runs.
- `EncoderGraph`: `input_ids`, `attention_mask` (+ the expert inputs) -> `last_hidden_state`.
- `DecoderGraph`: `input_ids`, `attention_mask [B, past + T]`, `position_ids` (+ the expert
  inputs), `past.{i}.key|value [B, kv_heads, past, head_dim]` -> `logits`, `present.{i}.*`.
  One graph serves prefill (a past of length 0) and incremental decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.export import Dim
from transformers import DynamicCache

from ..models.cache import cache_in, cache_keyword
from ..models.families import family_for
from ..refactor.moe import moe_layers
from ..routers.base import Routing, combine_weights


def pregate_network(model: nn.Module):
    """The model's pre-gating router network, or None when routing happens inside layers."""
    return getattr(model, "recast_router", None)


def is_decoder(model: nn.Module) -> bool:
    return family_for(model.config.model_type).causal_lm


class RouterGraph(nn.Module):
    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, input_ids: Tensor, past: list[tuple[Tensor, Tensor]]):
        logits, present = self.network.cached_forward(input_ids, past)
        values, indices = torch.topk(logits, self.network.top_k, dim=-1)
        weights = combine_weights(values, self.network.combine, scores=logits)
        return indices, torch.ones_like(values) if weights is None else weights, present


class _Backbone(nn.Module):
    """Runs the model with the experts a pre-gating router chose outside the graph, if any."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.network = pregate_network(model)

    def run(
        self,
        expert_indices: Tensor | None,
        expert_weights: Tensor | None,
        experts: list[tuple[Tensor, Tensor]] | None = None,
        **kwargs,
    ):
        """`experts` (offload graphs): every MoE layer's (fc1, fc2) per expert, layer-major."""
        if self.network is None:
            return self.model(**kwargs)
        k = expert_indices.shape[-1]
        self.network.given_plan = Routing(
            expert_indices.reshape(-1, k), expert_weights.reshape(-1, k)
        )
        layers = moe_layers(self.model)
        if experts is not None:
            per_layer = len(experts) // len(layers)
            for i, moe in enumerate(layers):
                pairs = experts[i * per_layer : (i + 1) * per_layer]
                moe.given_experts = ([fc1 for fc1, _ in pairs], [fc2 for _, fc2 in pairs])
        try:
            return self.model(**kwargs)
        finally:
            self.network.given_plan = None
            for moe in layers:
                moe.given_experts = None


class EncoderGraph(_Backbone):
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        expert_indices: Tensor | None = None,
        expert_weights: Tensor | None = None,
    ) -> Tensor:
        out = self.run(
            expert_indices, expert_weights, input_ids=input_ids, attention_mask=attention_mask
        )
        return out.last_hidden_state


class DecoderGraph(_Backbone):
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        expert_indices: Tensor | None,
        expert_weights: Tensor | None,
        past: list[tuple[Tensor, Tensor]],
        experts: list[tuple[Tensor, Tensor]] | None = None,
    ):
        cache = DynamicCache(config=self.model.config)
        for layer, (key, value) in enumerate(past):
            cache.update(key, value, layer)
        out = self.run(
            expert_indices,
            expert_weights,
            experts,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_keyword(self.model): cache},
        )
        # the cache is extended in place: it holds the presents
        return out.logits, [(layer.keys, layer.values) for layer in cache.layers]


@dataclass
class CacheShape:
    """Per-layer key/value shape `[B, heads, length, head_dim]` of a decoder's KV cache."""

    layers: int
    heads: int
    head_dim: int


@torch.no_grad()
def cache_shape(model: nn.Module) -> CacheShape:
    """Read off a one-token forward, so every family's cache layout is handled alike."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    cache = cache_in(model(input_ids=ids, use_cache=True).values())
    keys = cache.layers[0].keys
    return CacheShape(len(cache.layers), keys.shape[1], keys.shape[3])


NAMES = {0: "batch", 1: "sequence"}


@dataclass
class Traceable:
    """A module with example inputs, their names and dynamic axes, and its output names."""

    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict  # per forward argument, as torch.export takes them
    axis_names: dict[str, dict[int, str]]  # per graph input: the names of its dynamic axes


def example_routing(model, batch: int, length: int, generator: torch.Generator):
    network = pregate_network(model)
    if network is None:
        return None, None
    scores = torch.rand(batch, length, network.num_experts, generator=generator)
    indices = scores.topk(network.top_k, dim=-1).indices
    return indices, torch.ones(batch, length, network.top_k)


def offload_inputs(model: nn.Module):
    """(example expert tensors, their names, dynamic axes, axis names) of an offload graph:
    per MoE layer and expert, `fc1 [H, (2 x) W]` and `fc2 [W, H]` (the expert store's layout),
    whose widths may be 0 (an expert the batch does not use, fed as an empty placeholder)."""
    tensors, names, dims, axis_names = [], [], [], {}
    for moe in moe_layers(model):
        bank = moe.bank
        for expert in range(bank.num):
            fc1 = bank.up[expert]
            if bank.gate is not None:
                fc1 = torch.cat([bank.gate[expert], fc1])
            tensors.append((fc1.T.detach().clone(), bank.down[expert].T.detach().clone()))
            prefix = f"experts.{moe.layer_index}.{expert}"
            names += [f"{prefix}.fc1", f"{prefix}.fc2"]
            width = Dim(f"width_{moe.layer_index}_{expert}", min=0)
            dims.append(({1: 2 * width if bank.gate is not None else width}, {0: width}))
            fc1_width = "2*width" if bank.gate is not None else "width"
            axis_names.update({f"{prefix}.fc1": {1: fc1_width}, f"{prefix}.fc2": {0: "width"}})
    return tensors, names, dims, axis_names


def traceables(
    model: nn.Module, dtype: torch.dtype = torch.float32, offload: bool = False
) -> dict[str, Traceable]:
    """What to export for `model`: {"router": ..., "model": ...} (router for pre-gating only).
    `offload`: the decoder backbone takes every expert's weights as inputs instead of holding
    them (a runtime feeds those of its expert cache)."""
    generator = torch.Generator().manual_seed(0)
    batch, length, past_length = 2, 5, 3  # sizes above 1: dims of 0/1 get specialised
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    longest = getattr(model.config, "max_position_embeddings", None)
    b, t = Dim("batch", min=1), Dim("sequence", min=1, max=longest)
    p = Dim("past", min=0)
    routed_axes = {}
    out: dict[str, Traceable] = {}
    network = pregate_network(model)
    routed_names, routed_dims = [], {}
    if network is not None:
        router_past = [  # [B, heads, past, head_dim] per block, like the backbone's cache
            tuple(
                torch.randn(*kv.shape[:2], past_length, kv.shape[3], generator=generator)
                for kv in layer
            )
            for layer in network.empty_cache(batch)
        ]
        names = [f"past.{i}.{kv}" for i in range(len(router_past)) for kv in ("key", "value")]
        out["router"] = Traceable(
            RouterGraph(network),
            (ids, router_past),
            ["input_ids", *names],
            ["expert_indices", "expert_weights", *[n.replace("past.", "present.") for n in names]],
            {
                "input_ids": {0: b, 1: t},
                "past": [({0: b, 2: p}, {0: b, 2: p}) for _ in router_past],
            },
            {"input_ids": NAMES, **{n: {0: "batch", 2: "past"} for n in names}},
        )
        routed_names = ["expert_indices", "expert_weights"]
        routed_dims = {"expert_indices": {0: b, 1: t}, "expert_weights": {0: b, 1: t}}
        routed_axes = {"expert_indices": NAMES, "expert_weights": NAMES}
    indices, weights = example_routing(model, batch, length, generator)
    if not is_decoder(model):
        mask = torch.ones(batch, length, dtype=torch.long)
        out["model"] = Traceable(
            EncoderGraph(model),
            (ids, mask, indices, weights),
            ["input_ids", "attention_mask", *routed_names],
            ["last_hidden_state"],
            {
                "input_ids": {0: b, 1: t},
                "attention_mask": {0: b, 1: t},
                "expert_indices": routed_dims.get("expert_indices"),
                "expert_weights": routed_dims.get("expert_weights"),
            },
            {"input_ids": NAMES, "attention_mask": NAMES, **routed_axes},
        )
        return out
    shape = cache_shape(model)
    total = Dim("total", min=1)  # the mask spans past + new tokens
    past = [
        tuple(
            torch.randn(batch, shape.heads, past_length, shape.head_dim, generator=generator).to(
                dtype
            )
            for _ in range(2)
        )
        for _ in range(shape.layers)
    ]
    mask = torch.ones(batch, past_length + length, dtype=torch.long)
    positions = torch.arange(past_length, past_length + length).expand(batch, -1)
    past_names = [f"past.{i}.{kv}" for i in range(shape.layers) for kv in ("key", "value")]
    present_names = [name.replace("past.", "present.") for name in past_names]
    experts, expert_names, expert_dims, expert_axes = (
        offload_inputs(model) if offload else (None, [], None, {})
    )
    out["model"] = Traceable(
        DecoderGraph(model),
        (ids, mask, positions, indices, weights, past, experts),
        ["input_ids", "attention_mask", "position_ids", *routed_names, *past_names, *expert_names],
        ["logits", *present_names],
        {
            "input_ids": {0: b, 1: t},
            "attention_mask": {0: b, 1: total},
            "position_ids": {0: b, 1: t},
            "expert_indices": routed_dims.get("expert_indices"),
            "expert_weights": routed_dims.get("expert_weights"),
            "past": [({0: b, 2: p}, {0: b, 2: p}) for _ in range(shape.layers)],
            "experts": expert_dims,
        },
        {
            "input_ids": NAMES,
            "attention_mask": {0: "batch", 1: "total"},
            "position_ids": NAMES,
            **routed_axes,
            **{name: {0: "batch", 2: "past"} for name in past_names},
            **expert_axes,
        },
    )
    return out
