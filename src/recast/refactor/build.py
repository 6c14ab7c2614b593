"""Build MoE layers from slices of the dense FFN weights and put them in the model.

One layer at a time: its slices are copied into stacked expert tensors, the dense FFN module is
dropped, and only then is the next layer built, so peak memory stays near one model plus one
layer's FFN (never a second full copy).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.families import Family
from ..models.surgery import DenseFFN, dense_ffn, layer_modules, replace_module
from ..routers import ROUTERS, Router
from ..routers.oracle import AllRouter
from .moe import ExpertBank, MoEFFN
from .partition import Partition


def expert_bank(ffn: DenseFFN, groups: list[list[int]], activation: str) -> ExpertBank:
    """Stack the neuron groups of `ffn` into one bank, padding narrower groups with zeros."""
    width = max(len(g) for g in groups)
    bank = ExpertBank(
        len(groups),
        width,
        ffn.hidden,
        activation,
        ffn.gate is not None,
        ffn.up_bias is not None,
        dtype=ffn.up.dtype,
    )
    with torch.no_grad():
        bank.mask.zero_()
        for e, ids in enumerate(groups):
            index = torch.tensor(ids, dtype=torch.long)
            n = len(ids)
            bank.up[e, :n] = ffn.up.index_select(0, index)
            bank.down[e, :, :n] = ffn.down.index_select(1, index)
            bank.mask[e, :n] = 1
            if bank.gate is not None:
                bank.gate[e, :n] = ffn.gate.index_select(0, index)
            if bank.up_bias is not None:
                bank.up_bias[e, :n] = ffn.up_bias.index_select(0, index)
            if bank.gate_bias is not None:
                bank.gate_bias[e, :n] = ffn.gate_bias.index_select(0, index)
    return bank


def moe_from_dense(
    ffn: DenseFFN, partition: Partition, activation: str, router: Router, combine: str, index: int
) -> MoEFFN:
    shared = expert_bank(ffn, [partition.shared], activation) if partition.shared else None
    down_bias: Tensor | None = None if ffn.down_bias is None else ffn.down_bias.clone()
    experts = expert_bank(ffn, partition.experts, activation)
    return MoEFFN(experts, shared, down_bias, router, combine, index)


def activation_of(model: nn.Module, family: Family) -> str:
    return getattr(model.config, family.act_config_key)


def convert_layers(
    model: nn.Module, family: Family, partitions: list[Partition], combine: str
) -> list[str]:
    """Replace every layer's FFN by an MoE layer; returns the replaced module paths.

    Layers start with the `all` router (the exact refactor); `attach_routers` sets the real one.
    """
    layers = layer_modules(model, family)
    # Check every layer before touching any.
    ffns_ok = [dense_ffn(layer, family, i) for i, layer in enumerate(layers)]
    if len(partitions) != len(layers):
        raise ValueError(f"{len(partitions)} partitions for {len(layers)} layers")
    for i, partition in enumerate(partitions):
        partition.validate(ffns_ok[i].width)
    del ffns_ok
    activation = activation_of(model, family)
    replaced = []
    for i, layer in enumerate(layers):
        moe = moe_from_dense(
            dense_ffn(layer, family, i),
            partitions[i],
            activation,
            AllRouter(len(partitions[i].experts)),
            combine,
            i,
        )
        replace_module(layer, family.ffn, moe)
        for path in family.identity:
            replace_module(layer, path, nn.Identity())
        replaced.append(f"{family.layers}.{i}.{family.ffn}")
    return replaced


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def attach_routers(
    model: nn.Module, kind: str, top_k: int, combine: str, options: dict, initialize: bool = True
) -> None:
    """Give every MoE layer of `model` a router of `kind` (see `recast.routers`), and record
    it in the model's `MoEInfo` so that saving writes what the model really does."""
    router_cls = ROUTERS.get(kind)
    layers = moe_layers(model)
    router_cls.attach(model, layers, top_k, combine, router_cls.Options(**options), initialize)
    for layer in layers:
        layer.combine = combine
    info = getattr(model, "recast", None)
    if info is not None:
        info.router = {"kind": kind, **options}
        info.top_k, info.combine = layers[0].router.top_k, combine
