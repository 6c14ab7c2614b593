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
    active: int  # per token: shared parts, compensator + the top-k experts' (unpadded) neurons
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

    def metrics(self, dense_params: int) -> dict:
        """The report's parameter rows, beside the dense model's `dense_params`."""
        return {
            "params_total": self.total,
            "params_active": self.active,
            "dense_params": dense_params,
            "active_ffn_fraction": self.active_ffn_fraction,
            "router_params": self.router,
            "router_compute_share": self.router_compute_share,
        }


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
    if moe.compensator is not None:  # runs on every token, like the shared expert
        shared += sum(p.numel() for p in moe.compensator.parameters())
    total = sum(widths) * per + shared + bias
    k = moe.router.top_k
    active = round(k * sum(widths) / len(widths)) * per + shared + bias
    return total, active


def moe_layer_count(layer: nn.Module, moe: MoEFFN) -> ParamCount:
    """Counts of one transformer layer whose FFN is `moe` (padding neurons are storage, not
    parameters)."""
    ffn_total, ffn_active = moe_count(moe)
    router = sum(p.numel() for p in moe.router.parameters())
    stored_ffn = sum(p.numel() for p in moe.parameters()) - router
    total = sum(p.numel() for p in layer.parameters()) - (stored_ffn - ffn_total)
    return ParamCount(total, total - ffn_total + ffn_active, ffn_total, ffn_active, router)


def total_count(layers: list[ParamCount], outer: int, pregate: nn.Module | None) -> ParamCount:
    """The model's counts from its layers', the `outer` parameters (embeddings, norms, head,
    a pre-gating router) and that router."""
    count = ParamCount(
        outer + sum(c.total for c in layers),
        outer + sum(c.active for c in layers),
        sum(c.ffn_total for c in layers),
        sum(c.ffn_active for c in layers),
        sum(c.router for c in layers),
    )
    if pregate is not None:
        count.router += sum(p.numel() for p in pregate.parameters())
        count.router_lookup = sum(
            m.weight.numel() for m in pregate.modules() if isinstance(m, nn.Embedding)
        )
    return count


def count_parameters(model: nn.Module, family: Family) -> ParamCount:
    """Counts for a dense model (everything active) or a recast MoE model."""
    total = sum(p.numel() for p in model.parameters())
    layers = layer_modules(model, family)
    moes = moe_layers(model)
    if moes:
        outer = total - sum(p.numel() for layer in layers for p in layer.parameters())
        counts = [moe_layer_count(layer, moe) for layer, moe in zip(layers, moes, strict=True)]
        return total_count(counts, outer, getattr(model, "recast_router", None))
    ffn_total = 0
    for i, layer in enumerate(layers):
        ffn = dense_ffn(layer, family, i)
        ffn_total += sum(
            t.numel()
            for t in (ffn.up, ffn.up_bias, ffn.gate, ffn.gate_bias, ffn.down, ffn.down_bias)
            if t is not None
        )
    return ParamCount(total, total, ffn_total, ffn_total)
