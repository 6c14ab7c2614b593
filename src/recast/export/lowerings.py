"""The ONNX lowerings of recast's MoE ops (`recast.ops`).

Tracing the eager MoE layer would bake in the experts the example tokens happened to use (its
loop runs over the experts present in the batch), so under export the layer calls this one op,
and each ONNX target lowers it its own way (measured in docs/PERFORMANCE.md, "Export against the peers"):

- `gather`: the (token, slot) pairs are ordered by expert (TopK as an argsort), their rows
  gathered once and split into one block per expert (counts from a one-hot sum), and each
  expert's matmuls (gate and up fused into one) run on its block alone; one Gather by the
  inverse permutation puts every result back at its (token, slot), then the slots are
  weighted (`combine: sum` has no weights) and summed. This is the eager layer's
  sort/bincount/split in plain ONNX: compute grows with the tokens routed, not with the expert
  count; each expert has its own matmuls and activation, each layer about 15 routing nodes.
  The faster form on CPU at every shape measured, and the only one whose experts can be
  quantized one by one.
- `contrib`: onnxruntime's `com.microsoft.MoE` kernel, fed the chosen experts as router
  logits (`log weight` at the chosen slots, -1e4 elsewhere) so its own top-k picks exactly
  them; `normalize_routing_weights` then gives `weight / sum(weights)`, and the sum (`k` for
  `combine: sum` and `softmax`; `softmax_all` weights have no fixed sum and are refused) is
  folded into fc2. One kernel per layer; on CUDA it avoids the host syncs that the gather
  form's data-dependent split costs (the CUDA default, unmeasured: no GPU here).

In pt2 programs the ops stay as they are and run their eager implementations.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

MOE_OPS = ("gather", "contrib")


def _ints(*values: int, shape: tuple[int, ...] | None = None):
    if shape is None:
        return op.Constant(value_ints=list(values))
    return op.Constant(
        value=onnx.numpy_helper.from_array(np.array(values, np.int64).reshape(shape))
    )


def _onnx_activation(name: str, h):
    """The activations recast's families use, in ONNX ops (opset 18 has no Gelu)."""
    if name in ("silu", "swish"):
        return op.Mul(h, op.Sigmoid(h))
    if name == "relu":
        return op.Relu(h)
    if name == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2))
        erf = op.Erf(op.Div(h, op.Constant(value_float=2.0**0.5)))
        return op.Mul(op.Mul(h, op.Constant(value_float=0.5)), op.Add(erf, 1.0))
    if name in ("gelu_new", "gelu_pytorch_tanh"):  # tanh approximation (GPT-2)
        cube = op.Mul(op.Constant(value_float=0.044715), op.Mul(h, op.Mul(h, h)))
        inner = op.Mul(op.Constant(value_float=(2.0 / 3.141592653589793) ** 0.5), op.Add(h, cube))
        return op.Mul(op.Mul(h, op.Constant(value_float=0.5)), op.Add(op.Tanh(inner), 1.0))
    raise NotImplementedError(f"activation {name!r} has no ONNX lowering")


def _linear(x, weight, bias=None):
    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def _routed(x, indices, weights, experts: int, expert_ffn):
    """The gather form around `expert_ffn(expert, rows) -> [n, H]` (see the module note);
    `weights` None: every chosen expert counts once (`combine: sum`)."""
    k = indices.shape[1]
    flat_experts = op.Reshape(indices, _ints(-1))  # [T * k]: the expert of each (token, slot)
    pairs = op.Shape(flat_experts)
    # (token, slot) positions ordered by expert, and how many each expert has
    order = op.TopK(flat_experts, pairs, largest=0, sorted=1)[1]
    counts = op.ReduceSum(
        op.Cast(
            op.Equal(
                op.Unsqueeze(flat_experts, _ints(0)), _ints(*range(experts), shape=(experts, 1))
            ),
            to=onnx.TensorProto.INT64,
        ),
        _ints(1),
        keepdims=0,
    )
    rows = op.Gather(x, op.Div(order, op.Constant(value_int=k)), axis=0)
    # one block of rows per expert (Split cannot take both sizes and a count in onnxruntime)
    blocks = op.SplitToSequence(rows, counts, axis=0)
    outputs = [
        expert_ffn(e, op.SequenceAt(blocks, op.Constant(value_int=e))) for e in range(experts)
    ]
    # back to (token, slot) order: the inverse permutation of `order` is its own argsort
    placed = op.Gather(op.Concat(*outputs, axis=0), op.TopK(order, pairs, largest=0)[1], axis=0)
    if weights is not None:
        placed = op.Mul(placed, op.Unsqueeze(op.Reshape(weights, _ints(-1)), _ints(1)))
    return op.ReduceSum(op.Reshape(placed, _ints(-1, k, x.shape[1])), _ints(1), keepdims=0)


def _swiglu_or_act(h, activation: str, gated: bool):
    """`act(gate) * up` of a fused [gate | up] projection, or `act(h)`."""
    if not gated:
        return _onnx_activation(activation, h)
    g, u = op.Split(h, axis=-1, num_outputs=2)
    return op.Mul(_onnx_activation(activation, g), u)


def gather_lowering(x, indices, weights, up, gate, down, up_bias, gate_bias, activation):
    def take(stacked, expert):
        return None if stacked is None else op.Gather(stacked, op.Constant(value_int=expert))

    def expert_ffn(expert, rows):
        if gate is None:
            fc1, bias = take(up, expert), take(up_bias, expert)
        else:  # gate and up as one matmul (their weights concatenate into one constant)
            fc1 = op.Concat(take(gate, expert), take(up, expert), axis=0)
            bias = None
            if up_bias is not None:
                bias = op.Concat(take(gate_bias, expert), take(up_bias, expert), axis=0)
        h = _swiglu_or_act(_linear(rows, fc1, bias), activation, gate is not None)
        return op.MatMul(h, op.Transpose(take(down, expert), perm=[1, 0]))

    return _routed(x, indices, weights, up.shape[0], expert_ffn)


def offload_lowering(x, indices, weights, fc1, fc2, activation, gated):
    """The gather form with each expert's weights as graph inputs (`fc1 [H, (2 x) W]`,
    `fc2 [W, H]`, the expert store's layout): a runtime feeds the experts a batch uses from
    its cache and one-neuron zero placeholders for the rest, which no row reaches."""

    def expert_ffn(expert, rows):
        h = _swiglu_or_act(op.MatMul(rows, fc1[expert]), activation, gated)
        return op.MatMul(h, fc2[expert])

    return _routed(x, indices, weights, len(fc1), expert_ffn)


def _moe_schema() -> onnx.defs.OpSchema:
    """onnxruntime's contrib MoE, declared so onnxscript can emit it (onnx has no schema)."""
    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional

    def param(name, option=schema.FormalParameterOption.Single):
        return schema.FormalParameter(name, "T", param_option=option)

    inputs = [param("input"), param("router_probs"), param("fc1_experts_weights")]
    inputs += [param("fc1_experts_bias", optional), param("fc2_experts_weights")]
    inputs += [param(n, optional) for n in ("fc2_experts_bias", "fc3_experts_weights")]
    inputs += [param("fc3_experts_bias", optional)]
    kinds = {
        "k": schema.AttrType.INT,
        "activation_type": schema.AttrType.STRING,
        "normalize_routing_weights": schema.AttrType.INT,
        "swiglu_fusion": schema.AttrType.INT,
        "activation_alpha": schema.AttrType.FLOAT,
        "activation_beta": schema.AttrType.FLOAT,
    }
    return schema(
        "MoE",
        "com.microsoft",
        1,
        inputs=inputs,
        outputs=[param("output")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[schema.Attribute(name, kind, "") for name, kind in kinds.items()],
    )


MSFT_MOE = Op(Opset("com.microsoft", 1), "MoE", _moe_schema())
# recast activation -> (contrib activation_type for an ungated FFN, for a SwiGLU one)
CONTRIB_ACTIVATIONS = {
    "silu": ("silu", "swiglu"),
    "swish": ("silu", "swiglu"),
    "relu": ("relu", None),
}


def contrib_lowering(x, indices, weights, up, gate, down, up_bias, gate_bias, activation):
    experts, k = up.shape[0], indices.shape[1]
    tokens = op.Shape(x, start=0, end=1)
    logits = op.Expand(op.Constant(value_float=-1e4), op.Concat(tokens, _ints(experts), axis=0))
    if weights is None:  # every chosen expert weighs 1: log 1 = 0
        chosen = op.Expand(op.Constant(value_float=0.0), op.Shape(indices))
    else:
        chosen = op.Log(weights)
    logits = op.ScatterElements(logits, indices, chosen, axis=1)
    if gate is None:
        fc1, fc1_bias, kind = up, up_bias, CONTRIB_ACTIVATIONS[activation][0]
    else:  # the CPU kernel wants gate and up rows interleaved: [g0, u0, g1, u1, ...]
        fc1 = op.Reshape(
            op.Concat(op.Unsqueeze(gate, _ints(2)), op.Unsqueeze(up, _ints(2)), axis=2),
            _ints(experts, -1, up.shape[2]),
        )
        fc1_bias = None
        if up_bias is not None:
            fc1_bias = op.Reshape(
                op.Concat(
                    op.Unsqueeze(gate_bias, _ints(2)), op.Unsqueeze(up_bias, _ints(2)), axis=2
                ),
                _ints(experts, -1),
            )
        kind = CONTRIB_ACTIVATIONS[activation][1]
    fc2 = op.Mul(down, op.Constant(value_float=float(k)))
    attributes = dict(k=k, activation_type=kind, normalize_routing_weights=1)
    if gate is not None:
        attributes.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    return MSFT_MOE(x, logits, fc1, fc1_bias, fc2, **attributes)


def contrib_supports(activation: str, gated: bool) -> bool:
    kinds = CONTRIB_ACTIVATIONS.get(activation)
    return kinds is not None and kinds[int(gated)] is not None


def translation_table(moe_op: str) -> dict:
    lowering = {"gather": gather_lowering, "contrib": contrib_lowering}[moe_op]
    return {
        torch.ops.recast.routed_experts.default: lowering,
        torch.ops.recast.routed_expert_list.default: offload_lowering,
    }
