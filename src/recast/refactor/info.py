"""What a converted model carries besides its weights: its MoE layout (`model.recast`).

Building records it, attaching routers updates it, and every output format writes from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from ..errors import FormatError
from .partition import ModelPartition


@dataclass
class MoEInfo:
    """What a converted model carries besides its weights (kept as `model.recast`)."""

    family: str
    num_experts: int
    top_k: int
    combine: str
    router: dict  # {"kind": ..., **that kind's options}
    expert_widths: list[int]  # stacked (padded) width per layer
    shared_widths: list[int]  # 0 where a layer has no shared expert
    activation: str
    bias: bool  # projections carry biases (GPT-2, BERT, Llama with mlp_bias)
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    compensator_ranks: list[int] = field(default_factory=list)  # per layer; [] when none
    partition: ModelPartition | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("partition")
        return data


def info_of(model: nn.Module) -> MoEInfo:
    info = getattr(model, "recast", None)
    if not isinstance(info, MoEInfo):
        raise FormatError("this model was not converted by recast (it has no MoE layout to save)")
    return info
