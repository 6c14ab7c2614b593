"""The recast output format (`output.format: recast`): an HF-style directory that
`AutoModel*.from_pretrained` loads.

`config.json` has `model_type: recast_moe` and wraps the dense model's config (`base_config`)
plus the MoE layout (`recast`). Loading builds the dense architecture without initialising
weights, swaps in MoE layers of the saved shapes, and loads the weights (`model.safetensors`, or
shards and their index) strictly. The
result is the family's own transformers class (e.g. `LlamaForCausalLM`) with MoE FFNs, so
`generate`, tokenizers and pipelines work unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import accelerate
import torch
import transformers
from torch import nn

from ..atomic import atomic_directory
from ..errors import FormatError, ModelLoadError
from ..models.families import Family, family_for
from ..models.surgery import layer_modules, replace_module, tied_weights
from ..refactor.compensate import Compensator
from ..refactor.info import MoEInfo
from ..refactor.moe import ExpertBank, MoEFFN
from ..refactor.partition import ModelPartition
from ..routers import attach_routers
from ..shards import DEFAULT_SHARD_SIZE, Checkpoint, shard_bytes, write_sharded
from .base import FORMATS, SHARD_BYTES, ModelFiles, OutputFormat, register_format

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
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    model = load(pretrained_model_name_or_path, torch.float32 if dtype is None else dtype)
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
    model: nn.Module,
    directory: str | Path,
    *,
    overwrite: bool = False,
    tokenizer=None,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Write `model` in the recast format (atomically; replaces a non-empty dir only with
    `overwrite`, and only one recast wrote); weights above `shard_size` are sharded."""
    with atomic_directory(Path(directory), overwrite) as staging:
        FORMATS.get("recast").write(model, staging, tokenizer, shard_bytes(shard_size))
    return Path(directory)


def write_config(directory: Path, base_config: dict, info: MoEInfo, causal_lm: bool) -> None:
    """`config.json` of the recast format: the dense config wrapped with the MoE layout."""
    config = {
        "model_type": MODEL_TYPE,
        "architectures": [(RecastMoEForCausalLM if causal_lm else RecastMoEModel).__name__],
        "base_config": base_config,
        "recast": {"format_version": FORMAT_VERSION, **info.to_json()},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))


@register_format
class RecastFormat(OutputFormat):
    """`output.format: recast`: any router and combine; its files load with recast."""

    name = "recast"

    def write_files(self, directory: Path, files: ModelFiles, shard_size: int = SHARD_BYTES):
        causal = family_for(files.config["model_type"]).causal_lm
        write_config(directory, files.config, files.info, causal)
        write_sharded(directory, files.tensors, shard_size)
        if files.info.partition is not None:
            files.info.partition.save(directory / "partition.json")
        if files.tokenizer is not None:
            files.tokenizer.save_pretrained(directory)


def install_skeleton(
    model: nn.Module, family: Family, info: MoEInfo, dtype: torch.dtype = torch.float32
) -> None:
    """Replace each FFN with an MoE layer of the saved shapes (weights filled in by loading)."""
    hidden = model.config.hidden_size
    for i, layer in enumerate(layer_modules(model, family)):
        gated, biased = family.gated, info.bias
        experts = ExpertBank(
            info.num_experts, info.expert_widths[i], hidden, info.activation, gated, biased, dtype
        )
        shared = None
        if info.shared_widths[i]:
            shared = ExpertBank(
                1, info.shared_widths[i], hidden, info.activation, gated, biased, dtype
            )
        down_bias = torch.zeros(hidden, dtype=dtype) if biased else None
        gate = None
        if info.shared_gate and shared is not None:
            gate = nn.Linear(hidden, 1, bias=False, dtype=dtype)
        moe = MoEFFN(experts, shared, down_bias, None, info.combine, i, gate)
        if info.compensator_ranks and info.compensator_ranks[i]:
            moe.compensator = Compensator(hidden, info.compensator_ranks[i], dtype)
        replace_module(layer, family.ffn, moe)
        for path in family.identity:
            replace_module(layer, path, nn.Identity())
    options = {k: v for k, v in info.router.items() if k != "kind"}
    attach_routers(model, info.router["kind"], info.top_k, info.combine, options, initialize=False)


def load(directory: str | Path, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """Load a recast-format directory (one file or shards) into the family's transformers
    class with MoE layers, in `dtype` ("auto": the dtype the files are stored in).

    The model is built on the meta device and takes the tensors as they are read, one at a
    time, so loading needs the model's memory and no second copy."""
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
    checkpoint = _checkpoint(directory)
    dtype = _dtype(dtype, checkpoint)
    auto = transformers.AutoModelForCausalLM if family.causal_lm else transformers.AutoModel
    with accelerate.init_empty_weights():  # parameters on meta; buffers (rotary) computed
        model = auto.from_config(base_config, dtype=dtype)
        install_skeleton(model, family, info, dtype)
    _load_weights(model, checkpoint, dtype)
    if (directory / "partition.json").exists():
        info.partition = ModelPartition.load(directory / "partition.json")
    model.recast = info
    return model.eval()


def _checkpoint(directory: Path) -> Checkpoint:
    try:
        return Checkpoint(directory)
    except ModelLoadError as exc:
        raise FormatError(str(exc)) from exc


def _dtype(dtype: torch.dtype | str, checkpoint: Checkpoint) -> torch.dtype:
    if dtype == "auto":
        return checkpoint.dtype()
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise FormatError(f"dtype {dtype!r} is not a torch dtype; give e.g. bfloat16 or auto")
        return resolved
    return dtype


def _load_weights(model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    expected = model.state_dict()
    state = {}
    for name in checkpoint.names:
        try:
            tensor = checkpoint.get(name)
        except ModelLoadError as exc:
            raise FormatError(str(exc)) from exc
        # Copied into a tensor of torch's own (64-byte aligned) allocation before it is
        # assigned: safetensors' buffers are aligned less, and unaligned data takes other
        # matmul kernels on some CPUs (results off by ~1e-6), so a loaded model would not
        # compute bit for bit the same. One tensor at a time: no second copy of the model.
        target = dtype if tensor.is_floating_point() else tensor.dtype
        state[name] = torch.empty(tensor.shape, dtype=target).copy_(tensor)
        del tensor
        if name in expected and state[name].shape != expected[name].shape:
            raise FormatError(
                f"{checkpoint.directory} does not match its config.json: tensor {name} has "
                f"shape {list(state[name].shape)}, the config says {list(expected[name].shape)}"
            )
    missing = [k for k in expected if k not in state and k not in tied_weights(model)]
    unexpected = [k for k in state if k not in expected]
    if unexpected or missing:
        raise FormatError(
            f"{checkpoint.directory} does not match its config.json (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()


register_auto_classes()  # importing the format makes transformers' Auto classes know it
