"""`output.format: qwen2_moe`: Qwen2-MoE's layout, whose shared expert has a sigmoid gate."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import transformers
from torch import Tensor

from ..models.families import Family
from ..refactor.info import MoEInfo
from .base import SHARD_BYTES, ModelFiles, register_format
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
    shared_gate = True

    def shared_expert_refusal(self, shared: float) -> str | None:
        if not shared:
            return "output.format qwen2_moe always has a shared expert: set experts.shared above 0"
        return None

    def write_files(self, directory: Path, files: ModelFiles, shard_size: int = SHARD_BYTES):
        super().write_files(directory, files, shard_size)
        if files.info.combine == "softmax":
            log.warning(
                "output.format qwen2_moe with experts.combine softmax: llama.cpp's qwen2moe "
                "never renormalises the top-k weights, so it computes another function from "
                "these files than transformers, vLLM and SGLang do; convert with "
                "experts.combine: softmax_all for a model llama.cpp runs too (docs/formats.md)"
            )

    def moe_config(self, config: dict, info: MoEInfo) -> dict:
        return {
            "intermediate_size": config["intermediate_size"],
            "moe_intermediate_size": expert_width(info),
            "shared_expert_intermediate_size": max(info.shared_widths),
            "num_experts": info.num_experts,
            "norm_topk_prob": info.combine == "softmax",
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            # vLLM and llama.cpp build Qwen2-MoE attention with q/k/v biases whatever the
            # config says: a source without them gets zero biases (see `layer_tensors`).
            "qkv_bias": True,
        }

    def layer_tensors(self, state: dict, prefix: str, family: Family, info: MoEInfo) -> dict:
        out = super().layer_tensors(state, prefix, family, info)
        return {**_zero_qkv_biases(out), **out}

    def ffn_tensors(self, ffn: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
        # the shared bank holds one expert, unpadded
        return {
            f"{prefix}.shared_expert.gate_proj.weight": ffn["shared.gate"][0],
            f"{prefix}.shared_expert.up_proj.weight": ffn["shared.up"][0],
            f"{prefix}.shared_expert.down_proj.weight": ffn["shared.down"][0],
            f"{prefix}.shared_expert_gate.weight": ffn["shared_gate.weight"],
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
