"""The MoE layer that replaces a dense FFN.

Experts are slices of the dense FFN's intermediate neurons, stored stacked (`[E, W, H]`), so a
layer holds one tensor per projection whatever the expert count. An optional shared expert
runs on every token. The down-projection bias is added once, after experts are summed, which is
what makes `combine: sum` with every expert selected equal to the dense FFN.

Experts narrower than the widest one are padded with zero neurons; `mask` keeps the padding at
exactly zero contribution even after training touches the padded weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from ..errors import RoutingError
from ..ops import routed_expert_list, routed_experts, slice_activations

SHARED_GATE_START = 2.0**-12  # see MoEFFN.add_shared_gate


@dataclass
class Routing:
    """Which experts each token uses: `indices[T, k]`, and `weights[T, k]` (None: all 1)."""

    indices: Tensor
    weights: Tensor | None = None


class ExpertBank(nn.Module):
    """`num` FFN slices of width `width` (SwiGLU when `gated`), stored stacked."""

    def __init__(
        self,
        num: int,
        width: int,
        hidden: int,
        activation: str,
        gated: bool,
        up_bias: bool,
        dtype: torch.dtype = torch.float32,
        fill=torch.zeros,  # torch.empty: the builder fills every element
    ):
        super().__init__()
        self.num, self.width, self.hidden, self.activation = num, width, hidden, activation
        self.act = ACT2FN[activation]
        self.up = nn.Parameter(fill(num, width, hidden, dtype=dtype))
        self.gate = nn.Parameter(fill(num, width, hidden, dtype=dtype)) if gated else None
        self.down = nn.Parameter(fill(num, hidden, width, dtype=dtype))
        self.up_bias = nn.Parameter(fill(num, width, dtype=dtype)) if up_bias else None
        self.gate_bias = nn.Parameter(fill(num, width, dtype=dtype)) if up_bias and gated else None
        self.register_buffer("mask", torch.ones(num, width, dtype=dtype))

    @property
    def widths(self) -> list[int]:
        """Real (unpadded) neurons per expert."""
        return [int(w) for w in self.mask.sum(dim=1).tolist()]

    def activations(self, x: Tensor, expert: int) -> Tensor:
        """Intermediate activations of one expert: `[n, W]` for `x` of `[n, H]`."""
        h = slice_activations(
            x,
            self.up[expert],
            None if self.gate is None else self.gate[expert],
            None if self.up_bias is None else self.up_bias[expert],
            None if self.gate_bias is None else self.gate_bias[expert],
            self.act,
        )
        if torch.compiler.is_exporting():  # exporters zero the padded neurons' weights first
            return h
        return h * self.mask[expert]

    def all_activations(self, x: Tensor) -> Tensor:
        """Activations of every expert at once: `[E, T, W]` (oracle routing, calibration)."""
        h = torch.einsum("th,ewh->etw", x, self.up)
        if self.up_bias is not None:
            h = h + self.up_bias[:, None, :]
        if self.gate is None:
            h = self.act(h)
        else:
            g = torch.einsum("th,ewh->etw", x, self.gate)
            if self.gate_bias is not None:
                g = g + self.gate_bias[:, None, :]
            h = self.act(g) * h
        return h * self.mask[:, None, :]

    def expert_forward(self, x: Tensor, expert: int) -> Tensor:
        """One expert's output without the down bias: `[n, H]`."""
        return nn.functional.linear(self.activations(x, expert), self.down[expert])

    def forward(self, x: Tensor, expert: int | None = None) -> Tensor:
        """`expert_forward(x, expert)`, or with no expert every expert's activations `[E, T, W]`.

        Everything that reads the weights goes through `forward` so that peft's LoRA on the
        stacked parameters (`target_parameters`), which applies its deltas around the
        wrapped module's forward, reaches every use of them.
        """
        return self.all_activations(x) if expert is None else self.expert_forward(x, expert)

    @torch.no_grad()
    def zero_padding(self) -> None:
        """Zero the padded neurons' weights (training or merged LoRA deltas may touch them), so
        that formats without a mask (Mixtral, Qwen2-MoE) see exactly zero contribution too."""
        keep = self.mask[..., None]
        self.up.mul_(keep)
        self.down.mul_(self.mask[:, None, :])
        if self.gate is not None:
            self.gate.mul_(keep)
        for bias in (self.up_bias, self.gate_bias):
            if bias is not None:
                bias.mul_(self.mask)


class MoEFFN(nn.Module):
    """A routed replacement for one dense FFN.

    `router` is a module mapping `(tokens [T, H], this layer)` to a `Routing` (the kinds are in
    `recast.routers`); layers are built without one and `recast.routers.attach_routers` sets it.

    `forward` groups tokens by selected expert and runs one matmul chain per expert that at
    least one token selected, so compute grows with top-k, not with the expert count.
    """

    def __init__(
        self,
        experts: ExpertBank,
        shared: ExpertBank | None,
        down_bias: Tensor | None,
        router: nn.Module | None,
        combine: str,
        layer_index: int,
        shared_gate: nn.Linear | None = None,
    ):
        super().__init__()
        self.experts = experts
        self.shared = shared
        self.shared_gate = shared_gate  # Qwen2-MoE: sigmoid(gate(x)) scales the shared expert
        self.down_bias = None if down_bias is None else nn.Parameter(down_bias)
        self.router = router
        self.combine = combine
        self.layer_index = layer_index
        self.given_experts = None  # (fc1 list, fc2 list) while an offload graph is traced
        # Per expert, the bank positions of its neurons, the best predictors of its activation
        # mass first, where the partition ranks them (what router.kind analytic reads; not saved).
        self.representatives: list[list[int]] | None = None
        # x -> what the experts left out would add (refactor.compensate; fitted after routing)
        self.compensator: nn.Module | None = None

    @property
    def num_experts(self) -> int:
        return self.bank.num

    @property
    def bank(self) -> ExpertBank:
        """The expert weights, also while peft wraps `experts` for LoRA training."""
        experts = self.experts
        return experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.router is None:
            raise RoutingError(
                f"MoE layer {self.layer_index} has no router; give the model one with "
                f"recast.routers.attach_routers"
            )
        routing = self.router(x, self)
        out = self.routed(x, routing)
        if self.compensator is not None and routing.indices.shape[1] < self.num_experts:
            out = out + self.compensator(x)  # with every expert selected none is left out
        if self.shared is not None:
            shared = self.shared(x, 0)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        if self.down_bias is not None:
            out = out + self.down_bias
        return out.reshape(shape)

    @torch.no_grad()
    def add_shared_gate(self) -> None:
        """Give the shared expert Qwen2-MoE's learned sigmoid gate, starting near 1: the gate's
        logits start near 0 (sigmoid 0.5) and the shared down projection doubles to match.

        Not exactly 0: llama.cpp computes this sigmoid as silu(x) / x, which is NaN at 0, so
        the weights start at SHARED_GATE_START (exact in fp16 and bf16), which moves the
        gate by about SHARED_GATE_START * sum(x) / 2 (1e-3 for unit-scale hidden states)."""
        if self.shared is None or self.shared_gate is not None:
            return
        self.shared_gate = nn.Linear(self.shared.hidden, 1, bias=False).to(self.shared.down)
        self.shared_gate.weight.fill_(SHARED_GATE_START)
        self.shared.down.mul_(2.0)

    def routed(self, x: Tensor, routing: Routing) -> Tensor:
        """Sum of the selected experts' outputs, each scaled by its routing weight if any."""
        if torch.compiler.is_exporting():
            return self.exported_routed(x, routing)
        tokens, k = routing.indices.shape
        flat = routing.indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        token_of = order // k
        grouped = x.index_select(0, token_of)
        outputs = []
        for expert, chunk in zip(
            counts.nonzero().flatten().tolist(),
            grouped.split(counts[counts > 0].tolist()),
            strict=True,
        ):
            outputs.append(self.experts(chunk, expert))
        y = torch.cat(outputs) if outputs else x.new_zeros(0, x.shape[-1])
        if routing.weights is not None:
            y = y * routing.weights.reshape(-1)[order, None].to(y.dtype)
        return x.new_zeros(tokens, x.shape[-1]).index_add_(0, token_of, y)

    def exported_routed(self, x: Tensor, routing: Routing) -> Tensor:
        """`routed` as one `recast::routed_experts` op, which each export target lowers in its
        own way (the eager loop above would bake in the experts the example tokens used)."""
        bank = self.bank
        weights = None if routing.weights is None else routing.weights.to(x.dtype)
        if self.given_experts is not None:  # offload graphs: weights are graph inputs
            fc1, fc2 = self.given_experts
            gated = bank.gate is not None
            return routed_expert_list(x, routing.indices, weights, fc1, fc2, bank.activation, gated)
        return routed_experts(
            x,
            routing.indices,
            weights,
            bank.up,
            bank.gate,
            bank.down,  # exporters zero the padding first (`zero_padding`): no mask needed
            bank.up_bias,
            bank.gate_bias,
            bank.activation,
        )

    def extra_repr(self) -> str:
        shared = 0 if self.shared is None else self.shared.widths[0]
        rank = 0 if self.compensator is None else self.compensator.rank
        return (
            f"layer={self.layer_index}, experts={self.num_experts}x{self.bank.width}, "
            f"shared={shared}, router={getattr(self.router, 'kind', None)}, combine={self.combine}"
            f", compensator rank={rank}"
        )


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    """The model's MoE layers, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEFFN)]
