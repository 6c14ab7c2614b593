"""The decoupled pre-gating router (Read-ME): one small causal transformer over token ids.

It sees only the token ids, runs before the backbone, and its one decision per token serves
every MoE layer, so a runtime knows all the experts a batch needs before the first layer runs.
Its embedding table starts as a projection of the backbone's embeddings onto their principal
directions, so it begins with the backbone's notion of which tokens are alike.
"""

from __future__ import annotations

import math
import types
import weakref

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..errors import RoutingError
from ..models.cache import cache_in
from .base import ROUTERS, Router, RouterOptions, Routing, combine_weights


class PregateOptions(RouterOptions):
    width: int = Field(128, ge=8)
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> PregateOptions:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        return self


def sinusoidal_positions(positions: Tensor, width: int) -> Tensor:
    """Fixed encodings `[..., width]` of integer `positions`, so the router takes sequences of
    any length (and, decoding with a cache, any offset)."""
    frequency = torch.exp(
        torch.arange(0, width, 2, dtype=torch.float32, device=positions.device)
        * (-math.log(10000.0) / width)
    )
    angles = positions.float()[..., None] * frequency
    # interleaved: sin at even features, cos at odd ones
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2)[..., :width]


class PregateNetwork(nn.Module):
    """Token ids `[B, T]` -> expert logits `[B, T, E]`, causally (position t sees tokens <= t)."""

    def __init__(
        self, vocab_size: int, num_experts: int, top_k: int, combine: str, options: PregateOptions
    ):
        super().__init__()
        self.vocab_size, self.num_experts, self.top_k, self.combine = (
            vocab_size,
            num_experts,
            top_k,
            combine,
        )
        self.width = options.width
        self.embed = nn.Embedding(vocab_size, options.width)
        layer = nn.TransformerEncoderLayer(
            options.width,
            options.heads,
            4 * options.width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, options.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(options.width)
        self.head = nn.Linear(options.width, num_experts)
        self.plan: Routing | None = None  # the routing of the backbone's current forward
        self.generating: Tensor | None = None  # generate's whole sequence for the next forward
        self.last_sequence: Tensor | None = None  # what the current forward routed
        # the token ids each live KV cache holds, for forwards that continue it
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.given_plan: Routing | None = None  # set by exported graphs that take expert ids

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: Tensor) -> None:
        """Project the backbone's embedding table onto its top principal directions."""
        centered = embeddings.float() - embeddings.float().mean(0)
        q = min(self.width, *centered.shape)
        _, _, directions = torch.pca_lowrank(centered, q=q, center=False)
        projected = centered @ directions
        projected = projected / projected.std().clamp(min=1e-6)
        self.embed.weight.normal_(0, 0.02)
        self.embed.weight[:, :q] = projected

    def forward(self, input_ids: Tensor) -> Tensor:
        if (
            not torch.compiler.is_exporting()  # exported graphs leave the check to the runtime
            and input_ids.numel()
            and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size)
        ):
            raise RoutingError(
                f"token id {int(input_ids.max())} is outside the router's vocabulary of "
                f"{self.vocab_size}; use the tokenizer the model was converted with"
            )
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = self.embed(input_ids) + sinusoidal_positions(positions, self.width).to(
            self.embed.weight
        )
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device)
        x = self.blocks(x, mask=causal, is_causal=True)
        return self.head(self.norm(x))

    def cached_forward(
        self, input_ids: Tensor, past: list[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """`forward` for the tokens after `past` (per block: keys and values
        `[B, heads, P, W / heads]`), returning their logits and the extended cache: what lets
        a runtime route each decoded token without rerunning the prefix. Same weights and
        arithmetic as `forward` (pre-norm blocks, exact GELU, no dropout)."""
        offset = past[0][0].shape[2]
        length = input_ids.shape[1]
        positions = torch.arange(offset, offset + length, device=input_ids.device)
        x = self.embed(input_ids) + sinusoidal_positions(positions, self.width).to(
            self.embed.weight
        )
        # query i (at offset + i) sees keys 0 .. offset + i
        keys = torch.arange(offset + length, device=input_ids.device)
        allowed = keys[None, :] <= positions[:, None]
        present = []
        for block, (past_key, past_value) in zip(self.blocks.layers, past, strict=True):
            attention = block.self_attn
            heads = attention.num_heads
            q, k, v = nn.functional.linear(
                block.norm1(x), attention.in_proj_weight, attention.in_proj_bias
            ).chunk(3, dim=-1)
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
            k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
            present.append((k, v))
            h = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            x = x + attention.out_proj(h.transpose(1, 2).flatten(-2))
            x = x + block.linear2(block.activation(block.linear1(block.norm2(x))))
        return self.head(self.norm(x)), present

    def empty_cache(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        heads = self.blocks.layers[0].self_attn.num_heads
        shape = (batch, heads, 0, self.width // heads)
        weight = self.embed.weight
        return [(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in self.blocks.layers]

    def select(self, logits: Tensor) -> Routing:
        values, indices = torch.topk(logits, self.top_k, dim=-1)
        return Routing(indices, combine_weights(values, self.combine, scores=logits))

    def plan_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the backbone: route every token once, before any layer runs.

        The router is causal: a token's experts depend on every token up to it. With a KV cache
        the backbone sees only the new tokens, so the router is run on the whole sequence
        behind them (see `sequence_behind`); no generate internals (argument names, how the
        prompt is fed) are assumed.
        """
        if self.given_plan is not None:
            self.plan = self.given_plan
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            self.plan = None
            return
        sequence = self.sequence_behind(ids, cache_in((*args, *kwargs.values())))
        self.generating, self.last_sequence = None, sequence
        logits = self(sequence)[:, -ids.shape[1] :]
        self.plan = self.select(logits.reshape(-1, self.num_experts))

    def sequence_behind(self, ids: Tensor, cache) -> Tensor:
        """The token ids `[B, cached + n]` whose last n are `ids`: `ids` alone without a
        filled cache; else the sequence `generate` holds (recorded by
        `prepare_inputs_for_generation`, so beam search's reordered rows are right); else the
        tokens that went into this cache object (chunked prefill, a hand-written decode loop),
        cut to the cache's length (assisted decoding crops rejected tokens off it)."""
        cached = cache.get_seq_length() if cache is not None else 0
        if not cached:
            return ids
        batch, new = ids.shape
        held = self.generating
        if (
            held is not None
            and held.shape == (batch, cached + new)
            and torch.equal(held[:, cached:], ids)
        ):
            return held
        seen = self.seen.get(cache)
        if seen is not None and seen.shape[0] == batch and seen.shape[1] >= cached:
            return torch.cat([seen[:, :cached], ids], dim=1)
        raise RoutingError(
            f"the pre-gating router cannot tell which {cached} tokens this KV cache holds: "
            f"continue from a cache that this model filled, or call it on the whole sequence"
        )

    def remember_cache(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Forward hook on the backbone: the cache it returns now holds `last_sequence`."""
        cache = cache_in(output.values()) if hasattr(output, "values") else None
        if cache is not None and self.last_sequence is not None:
            self.seen[cache] = self.last_sequence.detach()
        self.last_sequence = None


def record_generation(model: nn.Module, input_ids: Tensor, *args, **kwargs):
    """`prepare_inputs_for_generation` of pre-gated models: `generate` passes it the whole
    sequence so far, which the router needs, before it cuts off what the cache holds."""
    model.recast_router.generating = input_ids.detach()
    return type(model).prepare_inputs_for_generation(model, input_ids, *args, **kwargs)


@ROUTERS.register("pregate")
class PregateRouter(Router):
    """One MoE layer's view of the shared pre-gating decision."""

    kind = "pregate"
    Options = PregateOptions
    trainable = True

    def __init__(self, num_experts: int, top_k: int, combine: str, network: PregateNetwork):
        super().__init__(num_experts, top_k, combine)
        # A plain attribute, not a submodule: the network is registered once, on the model.
        object.__setattr__(self, "network", network)

    @classmethod
    def attach(cls, model, moes, top_k, combine, options: PregateOptions, initialize=True):
        network = PregateNetwork(
            model.config.vocab_size, moes[0].num_experts, top_k, combine, options
        )
        if initialize:
            network.init_from_embeddings(model.get_input_embeddings().weight)
        model.add_module("recast_router", network)
        model.base_model.register_forward_pre_hook(network.plan_hook, with_kwargs=True)
        model.base_model.register_forward_hook(network.remember_cache, with_kwargs=True)
        # bound to the model (an instance attribute), so copies of the model record their own
        model.prepare_inputs_for_generation = types.MethodType(record_generation, model)
        for moe in moes:
            moe.router = cls(moe.num_experts, top_k, combine, network)

    def forward(self, hidden: Tensor, moe) -> Routing:
        plan = self.network.plan
        if plan is None or plan.indices.shape[0] != hidden.shape[0]:
            raise RoutingError(
                "the pre-gating router needs input_ids: call the model with input_ids "
                "(not inputs_embeds) so experts are chosen before the backbone runs"
            )
        return plan
