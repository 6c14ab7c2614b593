"""The analytic router (CMoE): no training, each expert scored by its representative neurons.

A partition that ranks each expert's neurons by how well their |activation| follows the
expert's activation mass (`experts.strategy: activation_rate`) names, per expert, the neurons
whose activity is most like the whole expert's. The router computes those few neurons' activations on the
token (with unit-norm weight rows, as CMoE does, so that no expert wins by weight scale alone)
and takes their magnitude as the expert's score: E x m dot products where a trained gate has
E. A load-balancing bias, set on calibration text DeepSeek-V3 style (raised for experts
picked less than their share, lowered for the others), shifts the choice, not the weights.

`linear: true` replaces the scores with a linear gate fitted to their logarithm by least
squares on calibration hidden states: what the Mixtral and Qwen2-MoE layouts can store.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from transformers.activations import ACT2FN

from ..errors import RoutingError
from .base import ROUTERS, Router, RouterOptions, Routing, combine_weights


class AnalyticOptions(RouterOptions):
    # Neurons per expert whose mean |activation| is its score (best predictors first; on the
    # tiny LM 1 finds 0.56 of the oracle's top-2, 4 find 0.65).
    representatives: int = Field(4, ge=1)
    # Step of the load-balancing bias per calibration batch (0: no balancing); the bias is
    # added to the scores' softmax, in [0, 1], to choose experts.
    balance_rate: float = Field(0.0, ge=0, le=1)
    # A linear gate fitted to the scores (what stock MoE formats hold) in place of them.
    linear: bool = False


class RepresentativeScores(nn.Module):
    """Per token `[T, H]`, each expert's log mean |activation| of its representative neurons:
    `[T, E]`, from unit-norm copies of their up (and gate) rows, biases scaled alike."""

    def __init__(self, num: int, per_expert: int, hidden: int, activation: str, gated: bool):
        super().__init__()
        self.num, self.per_expert, self.activation = num, per_expert, activation
        self.act = ACT2FN[activation]
        rows = num * per_expert
        self.up = nn.Parameter(torch.zeros(rows, hidden), requires_grad=False)
        self.up_bias = nn.Parameter(torch.zeros(rows), requires_grad=False)
        self.gate = nn.Parameter(torch.zeros(rows, hidden), requires_grad=False) if gated else None
        self.gate_bias = nn.Parameter(torch.zeros(rows), requires_grad=False) if gated else None

    @torch.no_grad()
    def set_rows(self, bank, chosen: list[list[int]]) -> None:
        """Copy the bank's neurons `chosen[e]` (positions in expert e) as expert e's rows."""
        index = [(e, n) for e, ns in enumerate(chosen) for n in ns]
        experts, neurons = (torch.tensor(i) for i in zip(*index, strict=True))
        for weight, bias, rows, biases in (
            (bank.up, bank.up_bias, self.up, self.up_bias),
            (bank.gate, bank.gate_bias, self.gate, self.gate_bias),
        ):
            if rows is None:
                continue
            w = weight[experts, neurons].float()
            norm = w.norm(dim=-1).clamp(min=1e-12)
            rows.copy_(w / norm[:, None])
            if bias is not None:
                biases.copy_(bias[experts, neurons].float() / norm)

    def forward(self, hidden: Tensor) -> Tensor:
        x = hidden.to(self.up.dtype)
        h = nn.functional.linear(x, self.up, self.up_bias)
        if self.gate is None:
            h = self.act(h)
        else:
            h = self.act(nn.functional.linear(x, self.gate, self.gate_bias)) * h
        magnitude = h.abs().reshape(*h.shape[:-1], self.num, self.per_expert).mean(-1)
        return torch.log(magnitude + torch.finfo(magnitude.dtype).tiny)


@ROUTERS.register("analytic")
class AnalyticRouter(Router):
    """Top-k of the representative neurons' scores (plus the balancing bias); under
    `combine: softmax` the selected experts weigh by their share of the selected scores."""

    kind = "analytic"
    Options = AnalyticOptions

    def __init__(self, num_experts: int, top_k: int, combine: str, net: nn.Module):
        super().__init__(num_experts, top_k, combine)
        self.net = net  # RepresentativeScores, or the fitted nn.Linear (`linear: true`)
        self.register_buffer("bias", torch.zeros(num_experts))

    @classmethod
    def attach(cls, model, moes, top_k, combine, options: AnalyticOptions, initialize=True):
        for moe in moes:
            bank = moe.bank
            if options.linear and not initialize:  # fitted gates are built by calibration
                net = nn.Linear(bank.hidden, bank.num, bias=False)
            else:
                net = RepresentativeScores(
                    bank.num,
                    options.representatives,
                    bank.hidden,
                    bank.activation,
                    bank.gate is not None,
                )
            router = cls(bank.num, top_k, combine, net.to(bank.up.device))
            if initialize:
                router.init_from_experts(moe, options)
            moe.router = router

    def init_from_experts(self, moe, options: AnalyticOptions) -> None:
        """The representative rows from the layer's partition ranking (with `linear`, what
        `recast.routers.calibrate` fits the gate to and then replaces)."""
        if moe.representatives is None:
            raise RoutingError(
                f"router.kind analytic reads each expert's representative neurons, which MoE "
                f"layer {moe.layer_index}'s partition does not rank: use experts.strategy: "
                f"activation_rate"
            )
        if isinstance(self.net, RepresentativeScores):
            m = options.representatives  # experts narrower than m repeat their neurons
            self.net.set_rows(moe.bank, [(r * m)[:m] for r in moe.representatives])

    def scores(self, hidden: Tensor) -> Tensor:
        return self.net(hidden)

    def forward(self, hidden: Tensor, moe) -> Routing:
        logits = self.scores(hidden)
        chosen = torch.softmax(logits, dim=-1) + self.bias
        indices = torch.topk(chosen, self.top_k, dim=-1).indices
        values = logits.gather(-1, indices)
        return Routing(indices, combine_weights(values, self.combine, scores=logits))
