"""What a transformers causal LM becomes in a GGUF file: llama.cpp's architecture, its
hyperparameter keys and its tensors.

The rules follow llama.cpp's own converter (`convert_hf_to_gguf.py`, conversion/llama.py,
qwen.py, gpt2.py and base.py of the tree vendored by llama-cpp-python 0.3.36): names come
from `gguf.TensorNameMap`; a layer's experts are one [E, rows, cols] tensor per projection;
llama-architecture q/k projections are permuted from transformers' rotary layout to GGML's;
norms, biases, 1-D tensors and MoE gates stay f32. Tensors are read from the model in memory
(transformers 5 names, so one path whatever layout the files on disk have) and produced one at
a time while the file is written.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gguf
import numpy as np
import torch
import transformers
from torch import nn

from ...errors import ExportError

log = logging.getLogger("recast")

# File types `recast export --format gguf --quantize` writes itself with the gguf package.
# (K-quants are made by llama.cpp's quantizer from the f16 file: see runner.py.)
OWN_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Tensors llama.cpp reads as f32 whatever the file type (as its converter writes them).
ALWAYS_F32 = tuple(
    gguf.TENSOR_NAMES[kind].replace("{bid}", r"\d+")
    for kind in (
        gguf.MODEL_TENSOR.FFN_GATE_INP,
        gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
        gguf.MODEL_TENSOR.POS_EMBD,
    )
)


@dataclass(frozen=True)
class Architecture:
    """One llama.cpp architecture and how transformers' tensors reach it."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's llama graph wants GGML's rotary layout
    conv1d: tuple[str, ...] = ()  # GPT-2 Conv1D weights ([in, out]) to transpose

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHITECTURES = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mixtral": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2),
    "qwen2_moe": Architecture(gguf.MODEL_ARCH.QWEN2MOE),
    "gpt2": Architecture(gguf.MODEL_ARCH.GPT2, conv1d=("c_attn", "c_proj", "c_fc")),
}


def architecture_for(config: transformers.PretrainedConfig) -> Architecture:
    """llama.cpp's architecture for `config`, or ExportError if it would compute another
    function."""
    if config.model_type not in ARCHITECTURES:
        raise ExportError(
            f"GGUF export writes {', '.join(sorted(ARCHITECTURES))} models, not "
            f"{config.model_type}; export it to ONNX (--format onnx) instead"
        )
    if config.model_type == "qwen2_moe" and config.norm_topk_prob:
        raise ExportError(
            "llama.cpp's qwen2moe never renormalises the top-k expert weights, but this "
            "checkpoint's norm_topk_prob is true, so llama.cpp would compute another model; "
            "convert with experts.combine: softmax_all (norm_topk_prob false) for GGUF"
        )
    return ARCHITECTURES[config.model_type]


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, torch-order shape, GGML type, and how to make its data."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        if self.qtype == gguf.GGMLQuantizationType.F32:
            return 4 * math.prod(self.shape)
        if self.qtype == gguf.GGMLQuantizationType.F16:
            return 2 * math.prod(self.shape)
        return math.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))

    def data(self) -> np.ndarray:
        values = self.make().detach().to(torch.float32).contiguous().numpy()
        return gguf.quants.quantize(values, self.qtype)


def hyperparameters(writer: gguf.GGUFWriter, config: transformers.PretrainedConfig) -> None:
    """The `{arch}.*` keys llama.cpp's loader reads for this config."""
    c = config
    model_type = c.model_type
    if model_type == "gpt2":
        writer.add_context_length(c.n_positions)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        writer.add_block_count(c.n_layer)
        return
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    _rope(writer, c)
    window = getattr(c, "sliding_window", None)
    if window and getattr(c, "use_sliding_window", True):
        log.warning(
            "llama.cpp's %s architecture has no sliding-window attention: past %d tokens it "
            "attends further back than this checkpoint does (as llama.cpp's own converter)",
            ARCHITECTURES[model_type].name,
            window,
        )
    if model_type == "mixtral":
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    elif model_type == "qwen2_moe":
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    else:
        writer.add_feed_forward_length(c.intermediate_size)


def _rope(writer: gguf.GGUFWriter, config: transformers.PretrainedConfig) -> None:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind not in ("default", "llama3"):  # llama3 is the rope_freqs tensor (rope_factors)
        raise ExportError(
            f"GGUF export does not write rope_type {kind!r} (it writes default, linear, yarn "
            f"and llama3); export it to ONNX (--format onnx) instead"
        )


def plan_tensors(
    model: nn.Module, architecture: Architecture, target: gguf.GGMLQuantizationType
) -> list[PlannedTensor]:
    """Every tensor of the GGUF file, in writing order, without computing any yet."""
    config = model.config
    blocks = getattr(config, "num_hidden_layers", None) or config.n_layer
    table = gguf.get_tensor_name_map(architecture.arch, blocks)
    planned = []
    for hf_name, shape, make in _hf_tensors(model, architecture):
        name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(
                f"tensor {hf_name} has no place in llama.cpp's {architecture.name} "
                f"architecture; this checkpoint cannot be written as GGUF"
            )
        planned.append(PlannedTensor(name, shape, _tensor_type(name, shape, target), make))
    planned.extend(_rope_factors(config))
    return planned


def _tensor_type(name: str, shape: tuple[int, ...], target: gguf.GGMLQuantizationType):
    f32 = gguf.GGMLQuantizationType.F32
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return f32
    if any(re.fullmatch(pattern, name.removesuffix(".weight")) for pattern in ALWAYS_F32):
        return f32
    if target in (f32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        return target
    block = gguf.GGML_QUANT_SIZES[target][0]
    # A row that is not a whole number of blocks cannot take the type (llama.cpp's converter
    # falls back to f16 the same way).
    return target if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _hf_tensors(
    model: nn.Module, architecture: Architecture
) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(transformers name, shape, maker) of each tensor, split and permuted as llama.cpp wants:
    a fused `experts.gate_up_proj` [E, 2W, H] becomes `experts.gate_proj` and `up_proj`."""
    config = model.config
    for name, tensor in model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")):
            continue  # buffers, not weights
        if name.endswith(".experts.gate_up_proj"):
            width = tensor.shape[1] // 2
            base = name.removesuffix(".gate_up_proj")
            shape = (tensor.shape[0], width, tensor.shape[2])
            yield f"{base}.gate_proj.weight", shape, lambda t=tensor, w=width: t[:, :w]
            yield f"{base}.up_proj.weight", shape, lambda t=tensor, w=width: t[:, w:]
            continue
        if name.endswith(".experts.down_proj"):
            yield f"{name}.weight", tuple(tensor.shape), lambda t=tensor: t
            continue
        make: Callable[[], torch.Tensor] = lambda t=tensor: t  # noqa: E731
        shape = tuple(tensor.shape)
        if architecture.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = config.num_attention_heads
            make = lambda t=tensor, h=heads: _permute(t, h)  # noqa: E731
        elif architecture.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = config.num_key_value_heads
            make = lambda t=tensor, h=heads: _permute(t, h)  # noqa: E731
        elif name.endswith(".weight") and name.split(".")[-2] in architecture.conv1d:
            shape = shape[::-1]
            make = lambda t=tensor: t.T  # noqa: E731
        yield name, shape, make


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary halves → GGML's interleaved pairs (llama.cpp `LlamaModel.permute`)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope_factors(config) -> list[PlannedTensor]:
    """Llama-3's frequency-dependent rope scaling, which llama.cpp reads as `rope_freqs`."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type") != "llama3":
        return []
    factors = _llama3_rope_factors(config, rope)
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return [
        PlannedTensor(name, tuple(factors.shape), gguf.GGMLQuantizationType.F32, lambda: factors)
    ]


def _llama3_rope_factors(config, rope: dict) -> torch.Tensor:
    base = rope.get("rope_theta", 10000.0)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    wavelengths = 2 * math.pi / freqs
    smooth = (context / wavelengths - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelengths < context / high, torch.ones_like(freqs), between)
    return torch.where(wavelengths > context / low, torch.full_like(freqs, factor), factors)
