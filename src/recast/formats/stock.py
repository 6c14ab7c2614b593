"""What the stock MoE formats that plain transformers loads (Mixtral, Qwen2-MoE) share.

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
from typing import ClassVar

import safetensors.torch
import torch
import transformers
from torch import nn

from ..errors import FormatError, ParityError
from ..evaluate.metrics import lm_outputs
from ..models.families import Family, family_for
from ..models.surgery import layer_modules, untied_state
from ..refactor.info import MoEInfo, info_of
from ..refactor.moe import MoEFFN, moe_layers
from .base import OutputFormat

# Log-probabilities of the stock model and recast's may differ by fp32 reassociation only.
PARITY_ATOL = 1e-4

# transformers' grouped-GEMM expert kernels need 16-byte aligned rows; zero neurons pad the
# expert width up to a multiple of this many neurons (they contribute exactly 0).
WIDTH_MULTIPLE = 16

# Dense config keys a stock config does not take (or takes with another meaning).
DENSE_ONLY_KEYS = (
    "model_type",
    "architectures",
    "intermediate_size",
    "mlp_bias",
    "transformers_version",
    "attention_bias",
    "pretraining_tp",
    "use_sliding_window",
    "max_window_layers",
    "recast",
)


class StockFormat(OutputFormat):
    """A transformers MoE architecture: one linear gate per layer, softmax weights, fused
    experts, no FFN biases; written from the dense `families` only."""

    families: ClassVar[tuple[str, ...]]
    config_class: ClassVar[type[transformers.PretrainedConfig]]
    architecture: ClassVar[str]  # the config's `architectures` entry

    def cannot_express(
        self, *, router: str, router_options: dict, combine: str, shared: float
    ) -> str | None:
        if router != "layer" or router_options.get("hidden", 0):
            return (
                f"output.format {self.name} routes each layer with a linear gate on its hidden "
                f"state; it cannot express router.kind {router!r}"
                f"{' with an MLP gate' if router == 'layer' else ''}: use router.kind: "
                f"layer (hidden: 0) or output.format: recast"
            )
        if combine != "softmax":
            return (
                f"output.format {self.name} weights experts by softmax: "
                f"set experts.combine: softmax"
            )
        return self.shared_expert_refusal(shared)

    def shared_expert_refusal(self, shared: float) -> str | None:
        """Why the format cannot hold a shared expert of `shared` (its fraction of the FFN)."""
        raise NotImplementedError

    def check_family(self, family: Family, config: transformers.PretrainedConfig) -> None:
        if family.name not in self.families:
            raise FormatError(
                f"output.format {self.name} is written from {', '.join(self.families)} models, "
                f"not {family.name}"
            )
        if getattr(config, "mlp_bias", False):
            raise FormatError(
                f"output.format {self.name} has no FFN biases; this model's mlp_bias is true"
            )
        if getattr(config, "attention_bias", False):
            raise FormatError(
                f"output.format {self.name} has no bias on the attention output projection; "
                f"this model's attention_bias is true"
            )

    def moe_config(self, model: nn.Module, info: MoEInfo) -> dict:
        """The format's own config keys: expert count and widths."""
        raise NotImplementedError

    def layer_tensors(self, moe: MoEFFN, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors of one layer's FFN besides its gate and routed experts."""
        return {}

    def config(self, model: nn.Module) -> transformers.PretrainedConfig:
        info = info_of(model)
        base = {k: v for k, v in model.config.to_dict().items() if k not in DENSE_ONLY_KEYS}
        return self.config_class(
            **base,
            **self.moe_config(model, info),
            num_experts_per_tok=info.top_k,
            output_router_logits=False,
            architectures=[self.architecture],
        )

    def state(self, model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
        """Rename and reshape recast's tensors into the stock layout."""
        state = untied_state(model)
        out = {
            k: v
            for k, v in state.items()
            if f".{family.ffn}." not in k and not k.startswith("recast_router.")
        }
        width = expert_width(info_of(model))
        for i, layer in enumerate(layer_modules(model, family)):
            moe = layer.get_submodule(family.ffn)
            p = f"model.{family.layers}.{i}.{family.ffn}"
            bank = moe.bank
            gate, up = (_pad_width(t, 1, width) for t in (bank.gate, bank.up))
            out[f"{p}.gate.weight"] = moe.router.net.weight.detach().clone()
            out[f"{p}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
            out[f"{p}.experts.down_proj"] = _pad_width(bank.down * moe.router.top_k, 2, width)
            out.update(self.layer_tensors(moe, p))
        return out

    def write(self, model: nn.Module, directory: Path, tokenizer=None) -> None:
        for moe in moe_layers(model):
            moe.bank.zero_padding()
        self.config(model).save_pretrained(directory)
        safetensors.torch.save_file(
            self.state(model, family_for(model.config.model_type)),
            str(directory / "model.safetensors"),
            metadata={"format": "pt"},
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        info = info_of(model)
        if info.partition is not None:
            info.partition.save(directory / "partition.json")

    def check_written(
        self, model: nn.Module, directory: Path, sequences: list[list[int]], pad_id: int
    ) -> dict:
        """Load the written model with plain transformers and compare it with `model`: a
        stock file that computes something else must not be shipped."""
        stock = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32
        ).eval()
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
                f"the written {result['format']} model differs from the converted model by "
                f"{diff:.2e} in log-probabilities (tolerance {PARITY_ATOL:.0e}); "
                f"nothing was written"
            )
        return result


def expert_width(info: MoEInfo) -> int:
    """The stored expert width: the widest expert, padded to WIDTH_MULTIPLE."""
    width = max(info.expert_widths)
    return -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def _pad_width(tensor: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim).detach().contiguous()
