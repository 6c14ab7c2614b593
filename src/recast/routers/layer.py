"""Per-layer gates on hidden states (Mixtral style), initialised from the partition."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import ROUTERS, Router, RouterOptions, Routing


class LayerGateOptions(RouterOptions):
    # 0: a linear gate (what Mixtral and Qwen2-MoE store); > 0: Linear -> Tanh -> Linear of
    # that width (MoEfication's MLP router).
    hidden: int = Field(0, ge=0)


@ROUTERS.register("layer")
class LayerGate(Router):
    """Scores each expert from the layer's input hidden state and keeps the top-k."""

    kind = "layer"
    Options = LayerGateOptions
    trainable = True

    def __init__(
        self, num_experts: int, top_k: int, combine: str, hidden_size: int, mlp_width: int = 0
    ):
        super().__init__(num_experts, top_k, combine)
        if mlp_width:
            self.net = nn.Sequential(
                nn.Linear(hidden_size, mlp_width), nn.Tanh(), nn.Linear(mlp_width, num_experts)
            )
        else:
            self.net = nn.Linear(hidden_size, num_experts, bias=False)

    @classmethod
    def attach(cls, model, moes, top_k, combine, options: LayerGateOptions, initialize=True):
        for moe in moes:
            gate = cls(moe.num_experts, top_k, combine, moe.experts.hidden, options.hidden)
            if initialize:
                gate.init_from_experts(moe)
            moe.router = gate

    @torch.no_grad()
    def init_from_experts(self, moe) -> None:
        """Start from each expert's centroid of (normalised) up-projection rows (MoEfication):
        a token aligned with an expert's neurons scores that expert highest."""
        rows = nn.functional.normalize(moe.experts.up, dim=-1) * moe.experts.mask[..., None]
        centroids = rows.sum(1) / moe.experts.mask.sum(1, keepdim=True)  # [E, H]
        first = self.net if isinstance(self.net, nn.Linear) else self.net[0]
        if first.out_features == centroids.shape[0]:
            first.weight.copy_(nn.functional.normalize(centroids, dim=-1))
        else:  # MLP: the first layer sees the centroids among random directions
            n = min(first.out_features, centroids.shape[0])
            first.weight[:n] = nn.functional.normalize(centroids[:n], dim=-1) * first.weight[
                :n
            ].norm(dim=-1, keepdim=True)

    def scores(self, hidden: Tensor) -> Tensor:
        return self.net(hidden)

    def forward(self, hidden: Tensor, moe) -> Routing:
        return self.select(self.scores(hidden))
