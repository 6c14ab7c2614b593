"""`output.format: mixtral`: Mixtral's layout (routed experts only), from Llama and Mistral."""

from __future__ import annotations

import transformers

from ..refactor.info import MoEInfo
from .base import register_format
from .stock import StockFormat, expert_width


@register_format
class Mixtral(StockFormat):
    name = "mixtral"
    families = ("llama", "mistral")
    config_class = transformers.MixtralConfig
    architecture = "MixtralForCausalLM"
    moe_block = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")

    def shared_expert_refusal(self, shared: float) -> str | None:
        if shared:
            return (
                "output.format mixtral has no shared expert: set experts.shared: 0 or use qwen2_moe"
            )
        return None

    def moe_config(self, config: dict, info: MoEInfo) -> dict:
        return {
            "intermediate_size": expert_width(info),
            "num_local_experts": info.num_experts,
            "router_jitter_noise": 0.0,
        }
