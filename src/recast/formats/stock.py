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
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch
import transformers
from torch import Tensor, nn

from ..errors import FormatError, ParityError
from ..evaluate.metrics import LMOutputs, lm_outputs, lm_outputs_of
from ..logs import quiet
from ..models.families import Family
from ..refactor.info import MoEInfo
from ..shards import write_sharded
from .base import SHARD_BYTES, ModelFiles, OutputFormat

# Log-probabilities of the stock model and recast's may differ by fp32 reassociation only.
PARITY_ATOL = 1e-4
# ... and by the rounding of the folded top-k factor (see `_weight_scale`) to a 16-bit stored
# dtype, where that factor is not a power of two (bf16 keeps 8 bits of mantissa).
ROUNDED_ATOL = 2e-2

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
    checked = True

    def cannot_express(
        self,
        *,
        router: str,
        router_options: dict,
        combine: str,
        shared: float,
        compensated: bool = False,
    ) -> str | None:
        linear = (router == "layer" and not router_options.get("hidden", 0)) or (
            router == "analytic" and router_options.get("linear", False)
        )
        if not linear:
            return (
                f"output.format {self.name} routes each layer with a linear gate on its hidden "
                f"state; it cannot express router.kind {router!r}"
                f"{' with an MLP gate' if router == 'layer' else ''}: use router.kind: "
                f"layer (hidden: 0), router.kind: analytic with linear: true, or "
                f"output.format: recast"
            )
        if compensated:
            return self.compensator_refusal
        if combine not in self.combines:
            return (
                f"output.format {self.name} weights experts by softmax: "
                f"set experts.combine: {' or '.join(self.combines)}"
            )
        return self.shared_expert_refusal(shared)

    @property
    def compensator_refusal(self) -> str:
        return (
            f"output.format {self.name} has no place for a compensator (a linear map beside the "
            f"experts): set compensate.rank: 0 or output.format: recast"
        )

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

    def moe_config(self, config: dict, info: MoEInfo) -> dict:
        """The format's own config keys: expert count and widths (`config`: the dense one)."""
        raise NotImplementedError

    def ffn_tensors(self, ffn: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """Tensors of one layer's FFN besides its gate and routed experts."""
        return {}

    def outer_tensors(self, tensors: dict, tied: dict[str, str]) -> dict:
        out = {k: v for k, v in tensors.items() if not k.startswith("recast_router.")}
        # llama.cpp needs the head as a tensor of its own even where the embedding is tied.
        for target, source in tied.items():
            if target == "lm_head.weight" and source in out:
                out[target] = out[source]
        return out

    def layer_tensors(self, state: dict, prefix: str, family: Family, info: MoEInfo) -> dict:
        """Rename and split recast's FFN tensors into the per-expert Hub layout."""
        ffn_prefix = f"{prefix}{family.ffn}."
        ffn = {k.removeprefix(ffn_prefix): v for k, v in state.items() if k.startswith(ffn_prefix)}
        out = {k: v for k, v in state.items() if not k.startswith(ffn_prefix)}
        if "compensator.down.weight" in ffn:
            raise FormatError(self.compensator_refusal)
        width = expert_width(info)
        p = prefix + self.moe_block
        gate_name, up_name, down_name = self.expert_names
        projections = {
            gate_name: _pad_width(ffn["experts.gate"], 1, width),
            up_name: _pad_width(ffn["experts.up"], 1, width),
            down_name: _pad_width(ffn["experts.down"] * _weight_scale(info), 2, width),
        }
        out[f"{p}.gate.weight"] = ffn["router.net.weight"]
        for name, stacked in projections.items():
            for e, weight in enumerate(stacked):
                out[f"{p}.experts.{e}.{name}.weight"] = weight
        out.update(self.ffn_tensors(ffn, p))
        return out

    def write_files(self, directory: Path, files: ModelFiles, shard_size: int = SHARD_BYTES):
        info = files.info
        base = {k: v for k, v in files.config.items() if k not in DENSE_ONLY_KEYS}
        self.config_class(
            **base,
            **self.moe_config(files.config, info),
            num_experts_per_tok=info.top_k,
            output_router_logits=False,
            architectures=[self.architecture],
        ).save_pretrained(directory)
        add_legacy_config_keys(directory / "config.json")
        write_sharded(directory, files.tensors, shard_size)
        if files.tokenizer is not None:
            files.tokenizer.save_pretrained(directory)
            _name_tokenizer_class_for_every_reader(directory / "tokenizer_config.json")
        if info.partition is not None:
            info.partition.save(directory / "partition.json")

    def check_written(
        self, model: nn.Module, directory: Path, sequences: list[list[int]], pad_id: int
    ) -> dict:
        """Load the written model with plain transformers and compare it with `model`: a
        stock file that computes something else must not be shipped."""
        stock = _load_written(directory)
        with torch.no_grad():
            ours = lm_outputs(model.eval(), sequences, 4, pad_id)
            theirs = lm_outputs(stock, sequences, 4, pad_id)
        return _compared(directory, ours, theirs, PARITY_ATOL)

    def check_layout(self, info: MoEInfo) -> None:
        width = expert_width(info)
        narrower = [i for i, w in enumerate(info.expert_widths) if _padded(w) != width]
        if narrower:
            raise FormatError(
                f"output.format {self.name} stores one expert width ({width}) but layer "
                f"{narrower[0]}'s experts are narrower; convert with stream.enabled: false"
            )

    def check_offloaded(self, directory, info, batches, ours, memory, offload, dtype) -> dict:
        """Transformers loads the written files with accelerate's offloading (at most `memory`
        bytes of weights in memory, the rest read from `offload` as it runs)."""
        scale = _weight_scale(info)
        exact = dtype == torch.float32 or scale & (scale - 1) == 0  # x 2^n rounds exactly
        stock = _load_written(
            directory, device_map="auto", max_memory={"cpu": memory}, offload_folder=str(offload)
        )
        with torch.no_grad():
            theirs = lm_outputs_of(
                (ids, mask, stock(input_ids=ids, attention_mask=mask).logits)
                for ids, mask in batches
            )
        return _compared(directory, ours, theirs, PARITY_ATOL if exact else ROUNDED_ATOL)


def _load_written(directory: Path, **placement) -> nn.Module:
    with quiet("transformers", "accelerate"):  # disk offload is what is asked for
        stock, loading = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, output_loading_info=True, **placement
        )
    unread = {k: v for k, v in loading.items() if k != "error_msgs" and v}
    if unread:
        raise ParityError(
            f"transformers does not read the written files as they are meant: {unread}; "
            f"nothing was written"
        )
    return stock.eval()


def _compared(directory: Path, ours: LMOutputs, theirs: LMOutputs, tolerance: float) -> dict:
    diff = float((ours.log_probs - theirs.log_probs).abs().max())
    agreement = float((ours.log_probs.argmax(-1) == theirs.log_probs.argmax(-1)).float().mean())
    result = {
        "format": json.loads((directory / "config.json").read_text())["model_type"],
        "max_abs_logprob_diff": diff,
        "top1_agreement": agreement,
        "tokens": int(ours.targets.numel()),
        "tolerance": tolerance,
    }
    if not diff <= tolerance:
        raise ParityError(
            f"the written {result['format']} model differs from the converted model by "
            f"{diff:.2e} in log-probabilities (tolerance {tolerance:.0e}); nothing was written"
        )
    return result


def expert_width(info: MoEInfo) -> int:
    """The stored expert width: the widest expert, padded to WIDTH_MULTIPLE."""
    return _padded(max(info.expert_widths))


def _padded(width: int) -> int:
    return -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def _weight_scale(info: MoEInfo) -> int:
    """The factor recast's weights carry over the stock softmax (see `combine_weights`): k for
    `softmax`, E for `softmax_all`."""
    return info.num_experts if info.combine == "softmax_all" else info.top_k


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
