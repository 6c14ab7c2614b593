"""`output.format: qwen2_moe`: Qwen2-MoE's layout, whose shared expert has a sigmoid gate."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers
from torch import nn

from ..models.families import Family
from ..refactor.info import MoEInfo, info_of
from ..refactor.moe import MoEFFN, moe_layers
from .base import SHARD_BYTES, register_format
from .stock import StockFormat, expert_width

log = logging.getLogger("recast")


@register_format
class Qwen2MoE(StockFormat):
    name = "qwen2_moe"
    families = ("llama", "mistral", "qwen2")
    config_class = transformers.Qwen2MoeConfig
    architecture = "Qwen2MoeForCausalLM"
    moe_block = "mlp"
    expert_names = ("gate_proj", "up_proj", "down_proj")
    combines = ("softmax", "softmax_all")  # norm_topk_prob true / false

    def shared_expert_refusal(self, shared: float) -> str | None:
        if not shared:
            return "output.format qwen2_moe always has a shared expert: set experts.shared above 0"
        return None

    def prepare(self, model: nn.Module) -> None:
        for layer in moe_layers(model):
            layer.add_shared_gate()
        model.recast.shared_gate = True

    def write(
        self, model: nn.Module, directory: Path, tokenizer=None, shard_size: int = SHARD_BYTES
    ) -> None:
        super().write(model, directory, tokenizer, shard_size)
        if info_of(model).combine == "softmax":
            log.warning(
                "output.format qwen2_moe with experts.combine softmax: llama.cpp's qwen2moe "
                "never renormalises the top-k weights, so it computes another function from "
                "these files than transformers, vLLM and SGLang do; convert with "
                "experts.combine: softmax_all for a model llama.cpp runs too (docs/formats.md)"
            )

    def moe_config(self, model: nn.Module, info: MoEInfo) -> dict:
        return {
            "intermediate_size": model.config.intermediate_size,
            "moe_intermediate_size": expert_width(info),
            "shared_expert_intermediate_size": max(info.shared_widths),
            "num_experts": info.num_experts,
            "norm_topk_prob": info.combine == "softmax",
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            # vLLM and llama.cpp build Qwen2-MoE attention with q/k/v biases whatever the
            # config says: a source without them gets zero biases (see `state`).
            "qkv_bias": True,
        }

    def state(self, model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
        state = super().state(model, family)
        return {**_zero_qkv_biases(state), **state}

    def layer_tensors(self, moe: MoEFFN, prefix: str) -> dict[str, torch.Tensor]:
        shared, n = moe.shared, moe.shared.widths[0]
        return {
            f"{prefix}.shared_expert.gate_proj.weight": shared.gate[0, :n].detach().clone(),
            f"{prefix}.shared_expert.up_proj.weight": shared.up[0, :n].detach().clone(),
            f"{prefix}.shared_expert.down_proj.weight": shared.down[0, :, :n].detach().contiguous(),
            f"{prefix}.shared_expert_gate.weight": moe.shared_gate.weight.detach().clone(),
        }


def _zero_qkv_biases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A zero bias for every q/k/v projection in `state` that has none (an exact no-op)."""
    projections = (
        ".self_attn.q_proj.weight",
        ".self_attn.k_proj.weight",
        ".self_attn.v_proj.weight",
    )
    return {
        f"{name.removesuffix('.weight')}.bias": weight.new_zeros(weight.shape[0])
        for name, weight in state.items()
        if name.endswith(projections) and f"{name.removesuffix('.weight')}.bias" not in state
    }
