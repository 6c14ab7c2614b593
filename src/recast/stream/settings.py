"""The recipe's `stream` section: whether and how a conversion runs layer by layer."""

from __future__ import annotations

from typing import Literal

from ..settings import Section

# `enabled: auto` streams checkpoints with at least this many bytes of weights (a whole-model
# conversion peaks near 3.5x the bf16 checkpoint; see docs/PERFORMANCE.md).
STREAM_ABOVE_BYTES = 1 << 30


class StreamSpec(Section):
    """Layer-by-layer conversion: one decoder layer in memory at a time."""

    # auto: stream checkpoints of 1 GiB and more when the recipe allows it
    enabled: bool | Literal["auto"] = "auto"
    # dense: calibrate each layer on the dense model's activations (what a whole-model
    # conversion sees, so it computes the same conversion); moe: on what the converted layers
    # before it produce (CMoE, GPTQ). Measured (scripts/bench_layer_inputs.py): moe is 3%
    # worse on MiniLM, 1% better on the tiny LM, so the default keeps the whole-model result.
    layer_inputs: Literal["moe", "dense"] = "dense"
    # auto: cuda when there is one
    device: Literal["auto", "cpu", "cuda"] = "auto"
