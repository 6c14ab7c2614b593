"""The recast output format (`output.format: recast`): an HF-style directory that
`AutoModel*.from_pretrained` loads.

`config.json` has `model_type: recast_moe` and wraps the dense model's config (`base_config`)
plus the MoE layout (`recast`). Loading builds the dense architecture without initialising
weights, swaps in MoE layers of the saved shapes, and loads `model.safetensors` strictly. The
result is the family's own transformers class (e.g. `LlamaForCausalLM`) with MoE FFNs, so
`generate`, tokenizers and pipelines work unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
import transformers
from torch import nn
from transformers.initialization import no_init_weights

from ..atomic import atomic_directory
from ..errors import FormatError
from ..models.families import Family, family_for
from ..models.surgery import layer_modules, replace_module, tied_weights, untied_state
from ..refactor.info import MoEInfo, info_of
from ..refactor.moe import ExpertBank, MoEFFN
from ..refactor.partition import ModelPartition
from ..routers import attach_routers
from .base import OutputFormat, register_format

MODEL_TYPE = "recast_moe"
FORMAT_VERSION = 2  # 2: `recast.router` is a dict of kind and options


class RecastMoEConfig(transformers.PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, base_config: dict | None = None, recast: dict | None = None, **kwargs):
        self.base_config = base_config or {}
        self.recast = recast or {}
        super().__init__(**kwargs)


def _load_from_dir(cls, pretrained_model_name_or_path, *args, **kwargs):
    """`from_pretrained` for the Auto classes; honours `dtype` and a single-device `device_map`."""
    model = load(pretrained_model_name_or_path)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype not in (None, "auto"):
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    device = kwargs.get("device_map")
    if isinstance(device, (str, torch.device)) and device != "auto":
        model = model.to(device)
    return model


class RecastMoEForCausalLM(transformers.PreTrainedModel):
    """Auto-class entry point; `from_pretrained` returns the family's own class with MoE FFNs."""

    config_class = RecastMoEConfig
    from_pretrained = classmethod(_load_from_dir)


class RecastMoEModel(transformers.PreTrainedModel):
    config_class = RecastMoEConfig
    from_pretrained = classmethod(_load_from_dir)


def register_auto_classes() -> None:
    transformers.AutoConfig.register(MODEL_TYPE, RecastMoEConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(RecastMoEConfig, RecastMoEForCausalLM, exist_ok=True)
    transformers.AutoModel.register(RecastMoEConfig, RecastMoEModel, exist_ok=True)


def save(
    model: nn.Module, directory: str | Path, *, overwrite: bool = False, tokenizer=None
) -> Path:
    """Write `model` in the recast format (atomically; replaces a non-empty dir only with
    `overwrite`, and only one recast wrote)."""
    with atomic_directory(Path(directory), overwrite) as staging:
        write_model(model, staging, tokenizer)
    return Path(directory)


def write_model(model: nn.Module, directory: Path, tokenizer=None) -> None:
    """The files of the recast format, into an existing (staging) directory."""
    info = info_of(model)
    config = {
        "model_type": MODEL_TYPE,
        "architectures": [
            (
                RecastMoEForCausalLM
                if family_for(model.config.model_type).causal_lm
                else RecastMoEModel
            ).__name__
        ],
        "base_config": model.config.to_dict(),
        "recast": {"format_version": FORMAT_VERSION, **info.to_json()},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    safetensors.torch.save_file(untied_state(model), str(directory / "model.safetensors"))
    if info.partition is not None:
        info.partition.save(directory / "partition.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


@register_format
class RecastFormat(OutputFormat):
    """`output.format: recast`: any router and combine; its files load with recast."""

    name = "recast"

    def write(self, model: nn.Module, directory: Path, tokenizer=None) -> None:
        write_model(model, directory, tokenizer)


def install_skeleton(model: nn.Module, family: Family, info: MoEInfo) -> None:
    """Replace each FFN with an MoE layer of the saved shapes (weights filled in by loading)."""
    hidden = model.config.hidden_size
    for i, layer in enumerate(layer_modules(model, family)):
        gated, biased = family.gated, info.bias
        experts = ExpertBank(
            info.num_experts, info.expert_widths[i], hidden, info.activation, gated, biased
        )
        shared = None
        if info.shared_widths[i]:
            shared = ExpertBank(1, info.shared_widths[i], hidden, info.activation, gated, biased)
        down_bias = torch.zeros(hidden) if biased else None
        gate = nn.Linear(hidden, 1, bias=False) if info.shared_gate and shared is not None else None
        moe = MoEFFN(experts, shared, down_bias, None, info.combine, i, gate)
        replace_module(layer, family.ffn, moe)
        for path in family.identity:
            replace_module(layer, path, nn.Identity())
    options = {k: v for k, v in info.router.items() if k != "kind"}
    attach_routers(model, info.router["kind"], info.top_k, info.combine, options, initialize=False)


def load(directory: str | Path) -> nn.Module:
    """Load a recast-format directory into the family's transformers class with MoE layers."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(
            f"{directory} has no readable config.json; is it a recast output?"
        ) from exc
    if config.get("model_type") != MODEL_TYPE:
        raise FormatError(
            f"{directory} holds a {config.get('model_type')!r} model, not {MODEL_TYPE!r}; "
            f"load it with transformers directly"
        )
    meta = dict(config["recast"])
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{directory} is recast format version {version}, this recast reads version "
            f"{FORMAT_VERSION}; convert the model again with this version"
        )
    info = MoEInfo(**meta)
    base = dict(config["base_config"])
    base_config = transformers.AutoConfig.for_model(base.pop("model_type"), **base)
    family = family_for(base_config.model_type)
    auto = transformers.AutoModelForCausalLM if family.causal_lm else transformers.AutoModel
    with no_init_weights():
        model = auto.from_config(base_config, dtype=torch.float32)
    install_skeleton(model, family, info)
    _load_weights(model, directory / "model.safetensors")
    if (directory / "partition.json").exists():
        info.partition = ModelPartition.load(directory / "partition.json")
    model.recast = info
    return model.eval()


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        state = safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as exc:
        raise FormatError(f"cannot read {path}: {exc}") from exc
    try:
        # copied into the model's own tensors, not assigned: safetensors' tensors are views of
        # one buffer at 8-byte offsets, and unaligned data takes other matmul kernels on some
        # CPUs (results off by ~1e-6), so a loaded model would not compute bit for bit the same
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise FormatError(
            f"{path} does not match its config.json: {str(exc).splitlines()[0]}"
        ) from exc
    missing = [k for k in result.missing_keys if k not in tied_weights(model)]
    if result.unexpected_keys or missing:
        raise FormatError(
            f"{path} does not match its config.json (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    model.tie_weights()


register_auto_classes()  # importing the format makes transformers' Auto classes know it
