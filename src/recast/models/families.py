"""Declarative family adapters: where each layer's FFN lives and what its projections are called.

A family is data, not code: the builder, the calibrator and the checkpoint validator all read
these tables, so adding a family means adding one `Family(...)` entry (torchtune `_FROM_HF`
style). Paths are relative to `model.base_model` (the backbone without its task head), so a
`LlamaForCausalLM` and a bare `LlamaModel` share one adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    """How one architecture family lays out its feed-forward networks.

    `up`, `gate` and `down` are module paths inside one layer. `ffn` is the module the MoE layer
    replaces; for BERT the FFN spans two modules (`intermediate` and `output.dense`), so the MoE
    layer takes the place of `intermediate` and `identity` lists what becomes `nn.Identity`
    (the residual add and LayerNorm of `BertOutput` stay as they are).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str  # path from base_model to the ModuleList of layers
    ffn: str
    up: str
    down: str
    act_config_key: str  # config attribute naming the activation
    gate: str | None = None  # SwiGLU families only
    conv1d: bool = False  # GPT-2 stores projections as Conv1D ([in, out] weights)
    identity: tuple[str, ...] = ()
    causal_lm: bool = True  # False: an encoder, evaluated by embeddings

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def hf_key(self, role: str, layer: int, base_prefix: str) -> str:
        """The checkpoint key of one projection's weight, e.g. `model.layers.3.mlp.up_proj.weight`."""
        path = getattr(self, role)
        prefix = f"{base_prefix}." if base_prefix else ""
        return f"{prefix}{self.layers}.{layer}.{path}.weight"


_SWIGLU = dict(
    layers="layers",
    ffn="mlp",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    act_config_key="hidden_act",
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(name="llama", model_types=("llama",), **_SWIGLU),
        Family(name="mistral", model_types=("mistral",), **_SWIGLU),
        Family(name="qwen2", model_types=("qwen2",), **_SWIGLU),
        Family(
            name="gpt2",
            model_types=("gpt2",),
            layers="h",
            ffn="mlp",
            up="mlp.c_fc",
            down="mlp.c_proj",
            act_config_key="activation_function",
            conv1d=True,
        ),
        Family(
            name="bert",
            model_types=("bert",),
            layers="encoder.layer",
            ffn="intermediate",
            up="intermediate.dense",
            down="output.dense",
            act_config_key="hidden_act",
            identity=("output.dense",),
            causal_lm=False,
        ),
    )
}


def family_for(model_type: str) -> Family:
    """The adapter for a config's `model_type`, or an error naming the supported ones."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}: recast converts {supported}"
    )
