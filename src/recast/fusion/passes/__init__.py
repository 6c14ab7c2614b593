"""Fusion passes, one per file, run in this order by `recast.fusion.fuse`:

    opset       the models' default-domain opsets brought to the highest (ONNX version converter)
    inputs      inputs that are the same tensor become one graph input
    dedup       initializers with the same content stored once
    cse         the same op on the same inputs computed once (across models)
    dead        ops and weights no output needs removed
    horizontal  parallel MatMul / Gemm / Conv on one input merged into one op and a Split

Each reports its rewrite count (and what it saved) in a `PassResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassResult:
    name: str
    rewrites: int
    detail: dict = field(default_factory=dict)


GRAPH_PASSES = ("inputs", "dedup", "cse", "dead", "horizontal")  # the ones a recipe may skip
