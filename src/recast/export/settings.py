"""Export settings: a recipe's `export:` section, or what `recast export` is given."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..settings import Section, validated


class ExpertBitsSpec(Section):
    # EdgeMoE: each expert gets 4 or 8 bits (or stays fp32) by its calibration importance,
    # the most important first, so that all experts' weights fit in this many MiB.
    budget_mb: float = Field(gt=0)


class QuantizeSpec(Section):
    experts: ExpertBitsSpec


class ExportSpec(Section):
    """A bundle for a runtime: `recast export`, or a recipe's `export:` after `convert`."""

    format: Literal["onnx", "pt2"] = "onnx"
    target: Literal["cpu", "cuda"] = "cpu"  # cuda: fp16 weights, onnxruntime's CUDA provider
    # int8: dynamic quantization of every matmul weight; {experts: {budget_mb}}: per-expert
    # bitwidths under a size budget (the rest int8).
    quantize: Literal["int8"] | QuantizeSpec | None = None
    moe_op: Literal["auto", "gather", "contrib"] = "auto"  # auto: gather on cpu, contrib on cuda
    compile: bool = False  # pt2: also an AOTInductor package
    offload: bool = False  # also store each expert on its own (experts/), for expert caching
    # fused: onnxruntime's transformer kernels (attention, skip layer norm, bias-gelu, rotary;
    # export/fusions.py); portable: standard ONNX only, which any ONNX runtime runs. auto:
    # fused unless quantized (the quantizers work on the unfused graph's MatMuls).
    graph: Literal["auto", "fused", "portable"] = "auto"
    dir: str | None = None  # default: <output dir>-<format>

    @field_validator("quantize", mode="wrap")
    @classmethod
    def _quantize_kind(cls, value, handler):
        # A mapping can only mean per-expert bitwidths: its errors, not "should be 'int8'".
        return QuantizeSpec.model_validate(value) if isinstance(value, dict) else handler(value)

    @model_validator(mode="after")
    def _consistent(self) -> ExportSpec:
        if self.quantize is not None and (self.format != "onnx" or self.target != "cpu"):
            raise ValueError("quantize is for format onnx with target cpu (cuda bundles are fp16)")
        if self.compile and self.format != "pt2":
            raise ValueError("compile makes an AOTInductor package: it needs format: pt2")
        if self.compile and self.target == "cuda":
            raise ValueError("compile builds CPU kernels from the CPU-traced program: target cpu")
        if self.format == "pt2" and self.moe_op != "auto":
            raise ValueError("moe_op chooses the ONNX lowering; pt2 programs keep recast's op")
        if self.offload and (self.format != "onnx" or self.quantize is not None):
            raise ValueError("offload is for fp32 onnx bundles (no quantize, no pt2)")
        if self.offload and self.resolved_moe_op == "contrib":
            raise ValueError("offload feeds experts one by one: it needs moe_op: gather")
        if self.graph != "auto" and self.format != "onnx":
            raise ValueError("graph chooses the ONNX graph's operators; pt2 has no graph option")
        if self.graph == "fused" and self.quantize is not None:
            raise ValueError("quantize works on the unfused graph's MatMuls: graph: portable")
        if isinstance(self.quantize, QuantizeSpec) and self.moe_op == "contrib":
            raise ValueError("per-expert bitwidths need moe_op: gather (one matmul per expert)")
        return self

    @property
    def fused(self) -> bool:
        """Whether the ONNX graphs get onnxruntime's transformer fusions."""
        if self.graph == "auto":
            return self.format == "onnx" and self.quantize is None
        return self.graph == "fused"

    @property
    def resolved_moe_op(self) -> str:
        if self.moe_op != "auto":
            return self.moe_op
        return "contrib" if self.target == "cuda" else "gather"


def export_spec(settings: ExportSpec | dict | None) -> ExportSpec:
    """Export settings checked like a recipe's `export:` section (RecipeError if invalid)."""
    if isinstance(settings, ExportSpec):
        return settings
    return validated(ExportSpec, settings or {}, "export settings", None)
