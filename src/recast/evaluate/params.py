"""Parameter counts: total, and active per token (what one token's forward pass touches)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models.families import Family
from ..models.surgery import dense_ffn, layer_modules
from ..refactor.moe import ExpertBank, MoEFFN, moe_layers


@dataclass
class ParamCount:
    total: int
    active: int  # per token: shared parts + the top-k experts' (unpadded) neurons
    ffn_total: int
    ffn_active: int
    router: int = 0  # parameters of the routers (per-layer gates or the pre-gating network)
    router_lookup: int = 0  # of which embedding tables: looked up, not multiplied

    @property
    def router_compute_share(self) -> float:
        """The routers' share of per-token multiply-adds (embedding lookups cost none)."""
        compute = self.router - self.router_lookup
        return compute / (self.active - self.router_lookup) if self.active else 0.0

    @property
    def active_ffn_fraction(self) -> float:
        return self.ffn_active / self.ffn_total if self.ffn_total else 1.0


def _per_neuron(bank: ExpertBank) -> int:
    """Parameters one intermediate neuron owns: its up (and gate) row, biases, down column."""
    rows = 2 if bank.gate is not None else 1
    biases = 0 if bank.up_bias is None else rows
    return bank.hidden * (rows + 1) + biases


def moe_count(moe: MoEFFN) -> tuple[int, int]:
    """(real FFN parameters, active per token) of one MoE layer; padding is not counted."""
    per = _per_neuron(moe.experts)
    widths = moe.experts.widths
    shared = 0 if moe.shared is None else moe.shared.widths[0] * per
    if moe.shared_gate is not None:
        shared += moe.shared_gate.weight.numel()
    bias = 0 if moe.down_bias is None else moe.down_bias.numel()
    total = sum(widths) * per + shared + bias
    k = moe.router.top_k
    active = round(k * sum(widths) / len(widths)) * per + shared + bias
    return total, active


def count_parameters(model: nn.Module, family: Family) -> ParamCount:
    """Counts for a dense model (everything active) or a recast MoE model."""
    total = sum(p.numel() for p in model.parameters())
    moes = moe_layers(model)
    if moes:
        counts = [moe_count(m) for m in moes]
        ffn_total = sum(c[0] for c in counts)
        ffn_active = sum(c[1] for c in counts)
        routers = sum(p.numel() for m in moes for p in m.router.parameters())
        pregate = getattr(model, "recast_router", None)
        lookup = 0
        if pregate is not None:
            routers += sum(p.numel() for p in pregate.parameters())
            lookup = sum(m.weight.numel() for m in pregate.modules() if isinstance(m, nn.Embedding))
        stored_ffn = sum(p.numel() for m in moes for p in m.parameters()) - sum(
            p.numel() for m in moes for p in m.router.parameters()
        )
        total -= stored_ffn - ffn_total  # padding neurons are storage, not parameters
        active = total - ffn_total + ffn_active
        return ParamCount(total, active, ffn_total, ffn_active, routers, lookup)
    ffn_total = 0
    for i, layer in enumerate(layer_modules(model, family)):
        ffn = dense_ffn(layer, family, i)
        ffn_total += sum(
            t.numel()
            for t in (ffn.up, ffn.up_bias, ffn.gate, ffn.gate_bias, ffn.down, ffn.down_bias)
            if t is not None
        )
    return ParamCount(total, total, ffn_total, ffn_total)
