"""Build MoE layers from slices of the dense FFN weights and put them in the model.

One layer at a time, and within a layer one projection at a time: the banks are allocated
empty (pages are only touched as they are filled), each dense projection is copied into every
bank and then released, so a layer's build holds its dense FFN plus about one projection's
worth of experts, and the model never holds a second copy of its FFNs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..models.families import Family
from ..models.surgery import DenseFFN, dense_ffn, layer_modules, replace_module
from .moe import ExpertBank, MoEFFN
from .partition import Partition

# The dense FFN's tensors in the order they are copied (the down bias is added once, after the
# experts are summed: it stays whole).
PROJECTIONS = ("up", "up_bias", "gate", "gate_bias", "down")


def empty_bank(ffn: DenseFFN, groups: list[list[int]], activation: str) -> ExpertBank:
    """A bank for the neuron groups of `ffn`, as wide as the widest, not yet filled."""
    return ExpertBank(
        len(groups),
        max(len(g) for g in groups),
        ffn.hidden,
        activation,
        ffn.gate is not None,
        ffn.up_bias is not None,
        dtype=ffn.up.dtype,
        fill=torch.empty,
    )


@torch.no_grad()
def fill_bank(bank: ExpertBank, role: str, source: Tensor, groups: list[list[int]]) -> None:
    """Copy each group's slice of one dense tensor into the bank, zeroing the padding."""
    target = getattr(bank, role)
    neurons = 1 if role == "down" else 0  # down is [H, I]; the others have neurons first
    for e, ids in enumerate(groups):
        n = len(ids)
        rows = source.index_select(neurons, torch.tensor(ids, dtype=torch.long))
        if neurons:
            target[e, :, :n] = rows
            target[e, :, n:] = 0
        else:
            target[e, :n] = rows
            target[e, n:] = 0


def moe_from_dense(
    ffn: DenseFFN,
    partition: Partition,
    activation: str,
    router: nn.Module | None,
    combine: str,
    index: int,
    release: Callable[[str], None] = lambda role: None,
) -> MoEFFN:
    """The MoE layer of `ffn` split by `partition`. `release(role)` is called once each of its
    PROJECTIONS is copied, for the caller to drop its references to that tensor."""
    banks = [(empty_bank(ffn, partition.experts, activation), partition.experts)]
    if partition.shared:
        banks.insert(0, (empty_bank(ffn, [partition.shared], activation), [partition.shared]))
    for role in PROJECTIONS:
        source = getattr(ffn, role)
        if source is None:
            continue
        for bank, groups in banks:
            fill_bank(bank, role, source, groups)
        del source
        release(role)
    for bank, groups in banks:
        bank.mask.zero_()
        for e, ids in enumerate(groups):
            bank.mask[e, : len(ids)] = 1
    down_bias: Tensor | None = None if ffn.down_bias is None else ffn.down_bias.clone()
    shared = banks[0][0] if partition.shared else None
    moe = MoEFFN(banks[-1][0], shared, down_bias, router, combine, index)
    if partition.representatives:
        positions = [{n: i for i, n in enumerate(ids)} for ids in partition.experts]
        moe.representatives = [
            [position[n] for n in ranked]
            for position, ranked in zip(positions, partition.representatives, strict=True)
        ]
    return moe


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
    """Replace one layer's FFN by an MoE layer (without a router); returns it. The dense
    projections are released as they are copied."""

    ffn = dense_ffn(layer, family, index)

    def release(role: str) -> None:
        setattr(ffn, role, None)
        module = layer.get_submodule(getattr(family, role.removesuffix("_bias")))
        setattr(module, "bias" if role.endswith("_bias") else "weight", None)

    moe = moe_from_dense(ffn, partition, activation, None, combine, index, release)
    replace_module(layer, family.ffn, moe)
    for path in family.identity:
        replace_module(layer, path, nn.Identity())
    return moe
