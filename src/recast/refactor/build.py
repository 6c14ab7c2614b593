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
    ffn: DenseFFN,
    partition: Partition,
    activation: str,
    router: nn.Module | None,
    combine: str,
    index: int,
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

    Layers start without a router; `recast.routers.attach_routers` gives them one.
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
    for i, layer in enumerate(layers):
        convert_layer(layer, i, family, partitions[i], combine, activation)
    return [f"{family.layers}.{i}.{family.ffn}" for i in range(len(layers))]


def convert_layer(
    layer: nn.Module,
    index: int,
    family: Family,
    partition: Partition,
    combine: str,
    activation: str,
) -> MoEFFN:
    """Replace one layer's FFN by an MoE layer (without a router); returns it."""
    moe = moe_from_dense(
        dense_ffn(layer, family, index), partition, activation, None, combine, index
    )
    replace_module(layer, family.ffn, moe)
    for path in family.identity:
        replace_module(layer, path, nn.Identity())
    return moe
