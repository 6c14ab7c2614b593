"""What the stock MoE formats that plain transformers loads (Mixtral, Qwen2-MoE) share.

The recast model is trained under the target's semantics before it is written (linear gates,
softmax weights, Qwen2-MoE's sigmoid shared-expert gate), so the written model is the trained
one; what differs is bookkeeping: stock routers renormalise the top-k weights to sum to 1, so
recast's factor (k, or E for `combine: softmax_all`; see `combine_weights`) is folded into the
down projections. The files are
the layout of the Mixtral and Qwen2-MoE checkpoints on the Hub, which every runtime reads
(transformers 4 and 5, vLLM, SGLang, llama.cpp's converter): one tensor per expert
projection, a top-level `rope_theta` beside transformers 5's `rope_parameters`, an explicit
`lm_head.weight` and a tokenizer class that transformers 4 knows (see docs/formats.md).
Every write is checked: the stock model is loaded back and its log-probabilities compared
with recast's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
import transformers
from torch import nn

from ..errors import FormatError, ParityError
from ..evaluate.metrics import lm_outputs
from ..models.families import Family, family_for
from ..models.surgery import layer_modules, untied_state
from ..refactor.info import MoEInfo, info_of
from ..refactor.moe import MoEFFN, moe_layers
from ..shards import write_sharded
from .base import SHARD_BYTES, OutputFormat

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
    """A transformers MoE architecture: one linear gate per layer, softmax weights, no FFN
    biases; written from the dense `families` only."""

    families: ClassVar[tuple[str, ...]]
    config_class: ClassVar[type[transformers.PretrainedConfig]]
    architecture: ClassVar[str]  # the config's `architectures` entry
    moe_block: ClassVar[str]  # the FFN's module name in the checkpoint's tensor names
    # The checkpoint names of each expert's gate, up and down projections.
    expert_names: ClassVar[tuple[str, str, str]]
    # The `experts.combine` weightings the architecture computes (routers.combine_weights).
    combines: ClassVar[tuple[str, ...]] = ("softmax",)

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
        if combine not in self.combines:
            return (
                f"output.format {self.name} weights experts by softmax: "
                f"set experts.combine: {' or '.join(self.combines)}"
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
        """Rename and split recast's tensors into the per-expert Hub layout."""
        state = untied_state(model)
        out = {
            k: v
            for k, v in state.items()
            if f".{family.ffn}." not in k and not k.startswith("recast_router.")
        }
        if "lm_head.weight" not in out:
            # llama.cpp needs the head as a tensor of its own even where the embedding is tied.
            out["lm_head.weight"] = model.get_output_embeddings().weight.detach().clone()
        width = expert_width(info_of(model))
        gate_name, up_name, down_name = self.expert_names
        for i, layer in enumerate(layer_modules(model, family)):
            moe = layer.get_submodule(family.ffn)
            p = f"model.{family.layers}.{i}.{self.moe_block}"
            bank = moe.bank
            projections = {
                gate_name: _pad_width(bank.gate, 1, width),
                up_name: _pad_width(bank.up, 1, width),
                down_name: _pad_width(bank.down * _weight_scale(moe), 2, width),
            }
            out[f"{p}.gate.weight"] = moe.router.net.weight.detach().clone()
            for name, stacked in projections.items():
                for e, weight in enumerate(stacked):
                    out[f"{p}.experts.{e}.{name}.weight"] = weight.clone()
            out.update(self.layer_tensors(moe, p))
        return out

    def write(
        self, model: nn.Module, directory: Path, tokenizer=None, shard_size: int = SHARD_BYTES
    ) -> None:
        for moe in moe_layers(model):
            moe.bank.zero_padding()
        self.config(model).save_pretrained(directory)
        add_legacy_config_keys(directory / "config.json")
        state = self.state(model, family_for(model.config.model_type))
        write_sharded(directory, list(state.items()), shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
            _name_tokenizer_class_for_every_reader(directory / "tokenizer_config.json")
        info = info_of(model)
        if info.partition is not None:
            info.partition.save(directory / "partition.json")

    def check_written(
        self, model: nn.Module, directory: Path, sequences: list[list[int]], pad_id: int
    ) -> dict:
        """Load the written model with plain transformers and compare it with `model`: a
        stock file that computes something else must not be shipped."""
        stock, loading = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, output_loading_info=True
        )
        stock.eval()
        unread = {k: v for k, v in loading.items() if k != "error_msgs" and v}
        if unread:
            raise ParityError(
                f"transformers does not read the written files as they are meant: {unread}; "
                f"nothing was written"
            )
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


def _weight_scale(moe: MoEFFN) -> int:
    """The factor recast's weights carry over the stock softmax (see `combine_weights`): k for
    `softmax`, E for `softmax_all`."""
    return moe.num_experts if moe.combine == "softmax_all" else moe.router.top_k


def _pad_width(tensor: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim).detach().contiguous()


def add_legacy_config_keys(path: Path) -> None:
    """Beside what transformers 5 writes, the keys that older readers (transformers 4, vLLM,
    llama.cpp's converter) look for at the top level and would otherwise default."""
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        config["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
    if "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# transformers 5 names every fast tokenizer's class so; transformers 4 (and llama.cpp's
# converter, which loads the tokenizer through it) cannot resolve the name.
TRANSFORMERS5_ONLY_TOKENIZER = "TokenizersBackend"


def _name_tokenizer_class_for_every_reader(path: Path) -> None:
    """Name the tokenizer.json-backed class both transformers 4 and 5 have."""
    if not path.exists():
        return
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == TRANSFORMERS5_ONLY_TOKENIZER:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
