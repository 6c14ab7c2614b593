"""Reference routers that need no training: `all` and `oracle`."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ROUTERS, Router, Routing, combine_weights


@ROUTERS.register("all")
class AllRouter(Router):
    """Every expert for every token, all scored equally: the MoE equals the dense model."""

    kind = "all"

    def __init__(self, num_experts: int, top_k: int | None = None, combine: str = "sum"):
        super().__init__(num_experts, num_experts, combine)

    def forward(self, hidden: Tensor, moe) -> Routing:
        indices = torch.arange(self.num_experts, device=hidden.device)
        indices = indices.expand(hidden.shape[0], -1)
        zeros = hidden.new_zeros(indices.shape)  # equal scores: every expert weighs 1
        return Routing(indices, combine_weights(zeros, self.combine, scores=zeros))


@ROUTERS.register("oracle")
class OracleRouter(Router):
    """The top-k experts by activation mass, computed from the dense intermediate activations.

    It runs every expert to look, so it saves nothing: it is the quality upper bound that
    trained routers are measured against. Scores are log-masses, so under `combine: softmax`
    the weights are k times each selected expert's share of the selected mass.
    """

    kind = "oracle"

    def forward(self, hidden: Tensor, moe) -> Routing:
        mass = moe.experts(hidden).abs().sum(dim=-1)  # every expert's activations: [E, T]
        return self.select(torch.log(mass.T + torch.finfo(mass.dtype).tiny))
