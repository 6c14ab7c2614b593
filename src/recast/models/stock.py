"""Writers for stock MoE formats that plain transformers loads: Mixtral, Qwen2-MoE.

The recast model is trained under the target's semantics before it is written (linear gates,
softmax weights, Qwen2-MoE's sigmoid shared-expert gate), so the written model is the trained
one; what differs is bookkeeping: stock routers renormalise the top-k weights to sum to 1, so
recast's factor k (see `combine_weights`) is folded into `down_proj`, and experts are stored
fused as transformers 5 does (`gate_up_proj [E, 2W, H]`, `down_proj [E, H, W]`).
Every write is checked: the stock model is loaded back and its log-probabilities compared
with recast's.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
import transformers
from torch import nn

from ..errors import FormatError, ParityError
from ..evaluate.metrics import lm_outputs
from ..refactor.build import moe_layers
from .families import Family
from .hf import info_of, untied_state
from .surgery import layer_modules

# Log-probabilities of the stock model and recast's may differ by fp32 reassociation only.
PARITY_ATOL = 1e-4

# transformers' grouped-GEMM expert kernels need 16-byte aligned rows; zero neurons pad the
# expert width up to a multiple of this many neurons (they contribute exactly 0).
WIDTH_MULTIPLE = 16

STOCK_FAMILIES = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("llama", "mistral", "qwen2")}


def check_family(fmt: str, family: Family, config: transformers.PretrainedConfig) -> None:
    """Refuse, before any work, a dense model the stock format cannot hold."""
    if fmt == "recast":
        return
    allowed = STOCK_FAMILIES[fmt]
    if family.name not in allowed:
        raise FormatError(
            f"output.format {fmt} is written from {', '.join(allowed)} models, not {family.name}"
        )
    if getattr(config, "mlp_bias", False):
        raise FormatError(f"output.format {fmt} has no FFN biases; this model's mlp_bias is true")
    if getattr(config, "attention_bias", False):
        raise FormatError(
            f"output.format {fmt} has no bias on the attention output projection; "
            f"this model's attention_bias is true"
        )


def _base_kwargs(config: transformers.PretrainedConfig) -> dict:
    data = config.to_dict()
    for key in (
        "model_type",
        "architectures",
        "intermediate_size",
        "mlp_bias",
        "transformers_version",
        "attention_bias",
        "pretraining_tp",
        "use_sliding_window",
        "max_window_layers",
    ):
        data.pop(key, None)
    data.pop("recast", None)
    return data


def stock_config(fmt: str, model: nn.Module) -> transformers.PretrainedConfig:
    info = info_of(model)
    base = _base_kwargs(model.config)
    width = stock_width(model)
    if fmt == "mixtral":
        return transformers.MixtralConfig(
            **base,
            intermediate_size=width,
            num_local_experts=info.num_experts,
            num_experts_per_tok=info.top_k,
            router_jitter_noise=0.0,
            output_router_logits=False,
            architectures=["MixtralForCausalLM"],
        )
    return transformers.Qwen2MoeConfig(
        **base,
        intermediate_size=model.config.intermediate_size,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=max(info.shared_widths),
        num_experts=info.num_experts,
        num_experts_per_tok=info.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=model.config.model_type == "qwen2",
        output_router_logits=False,
        architectures=["Qwen2MoeForCausalLM"],
    )


def stock_width(model: nn.Module) -> int:
    width = max(info_of(model).expert_widths)
    return -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def _pad_width(tensor: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim).detach().contiguous()


def stock_state(fmt: str, model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
    """Rename and reshape recast's tensors into the stock layout."""
    state = untied_state(model)
    out = {
        k: v
        for k, v in state.items()
        if f".{family.ffn}." not in k and not k.startswith("recast_router.")
    }
    width = stock_width(model)
    for i, layer in enumerate(layer_modules(model, family)):
        moe = layer.get_submodule(family.ffn)
        p = f"model.{family.layers}.{i}.{family.ffn}"
        bank = moe.bank
        gate, up = (_pad_width(t, 1, width) for t in (bank.gate, bank.up))
        out[f"{p}.gate.weight"] = moe.router.net.weight.detach().clone()
        out[f"{p}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{p}.experts.down_proj"] = _pad_width(bank.down * moe.router.top_k, 2, width)
        if fmt == "qwen2_moe":
            shared = moe.shared
            n = shared.widths[0]
            out[f"{p}.shared_expert.gate_proj.weight"] = shared.gate[0, :n].detach().clone()
            out[f"{p}.shared_expert.up_proj.weight"] = shared.up[0, :n].detach().clone()
            out[f"{p}.shared_expert.down_proj.weight"] = shared.down[0, :, :n].detach().contiguous()
            out[f"{p}.shared_expert_gate.weight"] = moe.shared_gate.weight.detach().clone()
    return out


def write_stock(
    fmt: str, model: nn.Module, family: Family, directory: Path, tokenizer=None
) -> None:
    """The stock-format files (config, weights, tokenizer) into an existing staging dir."""
    for moe in moe_layers(model):
        moe.bank.zero_padding()
    stock_config(fmt, model).save_pretrained(directory)
    safetensors.torch.save_file(
        stock_state(fmt, model, family),
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def parity_check(
    model: nn.Module, directory: Path, sequences: list[list[int]], pad_id: int
) -> dict:
    """Load the written stock model with plain transformers and compare it with `model`.

    Raises ParityError beyond PARITY_ATOL: a stock file that computes something else must
    not be shipped.
    """
    stock = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = lm_outputs(model.eval(), sequences, 4, pad_id)
        theirs = lm_outputs(stock, sequences, 4, pad_id)
    diff = float((ours.log_probs - theirs.log_probs).abs().max())
    agreement = float((ours.log_probs.argmax(-1) == theirs.log_probs.argmax(-1)).float().mean())
    result = {
        "format": json.loads((directory / "config.json").read_text())["model_type"],
        "max_abs_logprob_diff": diff,
        "top1_agreement": agreement,
        "tokens": int(ours.targets.numel()),
        "tolerance": PARITY_ATOL,
    }
    if not diff <= PARITY_ATOL:
        raise ParityError(
            f"the written {result['format']} model differs from the converted model by {diff:.2e} "
            f"in log-probabilities (tolerance {PARITY_ATOL:.0e}); nothing was written"
        )
    return result
