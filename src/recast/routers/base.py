"""The Router interface: hidden states (or token ids) in, expert choices out (`Routing`)."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from ..errors import RoutingError
from ..refactor.moe import MoEFFN, Routing, moe_layers
from ..registry import Registry


def combine_weights(values: Tensor, combine: str, *, scores: Tensor) -> Tensor | None:
    """Weights of the selected experts' scores `values[T, k]` (of all scores `scores[T, E]`):
    none for `sum`; for `softmax`, the softmax over the selected scores times k; for
    `softmax_all`, the softmax over all E scores at the selected ones, times E, not
    renormalised over the selected (Qwen2-MoE's `norm_topk_prob: false`, the only weighting
    llama.cpp's qwen2moe computes). Either way equal scores give each expert weight 1, so the
    MoE starts from the sum of its selected experts (the exact refactor's semantics). Stock
    formats weight by the softmax alone; their writers fold the k or E into `down_proj`."""
    if combine == "softmax":
        return torch.softmax(values, dim=-1) * values.shape[-1]
    if combine == "softmax_all":
        return torch.exp(values - torch.logsumexp(scores, dim=-1, keepdim=True)) * scores.shape[-1]
    return None


class RouterOptions(BaseModel):
    """Settings of one router kind (the extra keys of the recipe's `router` section)."""

    model_config = ConfigDict(extra="forbid")


class Router(nn.Module):
    """Maps one MoE layer's input tokens `[T, H]` to a `Routing`.

    `top_k` is how many routed experts each token uses; `combine` decides the weights: `sum`
    gives none (each selected expert counts fully, the exact refactor), `softmax` gives
    Mixtral-style weights (see `combine_weights`).

    A kind's `attach` gives every MoE layer of a model its router; the default makes one
    router per layer with no settings. Kinds that learn (`trainable`) expose `scores`, the
    per-token expert logits that router training fits to the oracle.
    """

    kind: ClassVar[str]
    Options: ClassVar[type[RouterOptions]] = RouterOptions
    trainable: ClassVar[bool] = False

    def __init__(self, num_experts: int, top_k: int, combine: str):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise RoutingError(f"top_k must be between 1 and {num_experts}, got {top_k}")
        self.num_experts, self.top_k, self.combine = num_experts, top_k, combine

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        moes: list[MoEFFN],
        top_k: int,
        combine: str,
        options: RouterOptions,
        initialize: bool = True,
    ) -> None:
        """Give each MoE layer its router; `initialize=False` when weights will be loaded."""
        for moe in moes:
            moe.router = cls(moe.num_experts, top_k, combine)

    def forward(self, hidden: Tensor, moe: MoEFFN) -> Routing:
        raise NotImplementedError

    def select(self, scores: Tensor) -> Routing:
        """Top-k of `scores[T, E]`, with weights according to `combine`."""
        values, indices = torch.topk(scores, self.top_k, dim=-1)
        return Routing(indices, combine_weights(values, self.combine, scores=scores))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, combine={self.combine}"


ROUTERS: Registry[type[Router]] = Registry("router")


def attach_routers(
    model: nn.Module,
    kind: str,
    top_k: int,
    combine: str,
    options: dict,
    initialize: bool = True,
    layers: list[MoEFFN] | None = None,
) -> None:
    """Give every MoE layer of `model` (or the given `layers` of it) a router of `kind`, and
    record it in the model's `MoEInfo` so that saving writes what the model really does."""
    router_cls = ROUTERS.get(kind)
    layers = moe_layers(model) if layers is None else layers
    router_cls.attach(model, layers, top_k, combine, router_cls.Options(**options), initialize)
    for layer in layers:
        layer.combine = combine
    info = getattr(model, "recast", None)
    if info is not None:
        info.router = {"kind": kind, **options}
        info.top_k, info.combine = layers[0].router.top_k, combine
