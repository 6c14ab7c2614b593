"""Weight quantization for CPU bundles: int8 dynamic quantization of every matmul weight, or
per-expert bitwidths chosen by importance under a size budget (EdgeMoE)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from ..errors import ExportError
from ..logs import quiet


def router_nodes(raw: Path) -> list[str]:
    """Names of the nodes that compute per-layer routing (the exporter records each node's
    module path): their matmuls stay fp32, as a flipped expert choice costs more than the
    few bytes quantizing a gate saves."""
    graph = onnx.load(str(raw), load_external_data=False).graph
    return [
        node.name
        for node in graph.node
        if any(
            p.key == "pkg.torch.onnx.name_scopes" and ".router'" in p.value
            for p in node.metadata_props
        )
    ]


def quantize_int8(source: Path, target_path: Path, keep_fp32: list[str] = ()) -> dict:
    """Every MatMul with a constant weight but those named in `keep_fp32` gets int8 weights
    (activations are quantized on the fly per call: onnxruntime's DynamicQuantizeMatMul).
    `source` should be constant-folded, so that transposed and per-expert weights are
    initializers the quantizer can see."""
    # Shapes recorded by onnxruntime's optimizer for the expert branches (NonZero-sized)
    # conflict with onnx's re-inference; the quantizer infers them afresh.
    model = onnx.load(str(source))
    del model.graph.value_info[:]
    cleared = source.with_suffix(".noshapes.onnx")
    onnx.save(model, str(cleared), save_as_external_data=True, location=cleared.name + ".data")
    with quiet(""):  # the quantizer logs per-node notes on the root logger
        quantize_dynamic(
            str(cleared),
            str(target_path),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=True,  # one scale per output column: outlier columns cost only themselves
            # 7-bit weights: onnxruntime's u8s8 kernel on CPUs without VNNI (AVX2's VPMADDUBSW)
            # saturates 8-bit products. Without it, on an AVX2-only CPU, a tiny GPT-2 MoE's
            # int8 error is 0.48 (0.16 with) and a Llama MoE's passes the 0.5 gate no more.
            reduce_range=True,
            use_external_data_format=True,
            nodes_to_exclude=list(keep_fp32),
        )
    return {"scheme": "int8 dynamic, per channel", "kept_fp32": len(keep_fp32)}


@dataclass
class ExpertSlot:
    """One routed expert of one layer: how often it is chosen and what it costs."""

    layer: int
    expert: int
    importance: float  # share of this layer's (token, slot) choices that picked it
    params: int
    bits: int = 4

    @property
    def bytes(self) -> float:
        # weights, plus one fp32 scale per block of 32 when quantized
        return self.params * (4.0 if self.bits == 32 else self.bits / 8 + 4 / 32)


def assign_bits(slots: list[ExpertSlot], budget_mb: float) -> list[ExpertSlot]:
    """EdgeMoE-style: in order of importance, each expert gets the widest of fp32, 8 and 4
    bits that still leaves room for every expert after it at 4 bits."""
    budget = budget_mb * 2**20
    for slot in slots:
        slot.bits = 4
    floor = sum(s.bytes for s in slots)
    if floor > budget:
        raise ExportError(
            f"the experts need {floor / 2**20:.2f} MiB even at 4 bits; "
            f"raise quantize.experts.budget_mb above {budget_mb:g}"
        )
    spent = floor
    for slot in sorted(slots, key=lambda s: -s.importance):
        at_four = slot.bytes
        for bits in (32, 8):
            slot.bits = bits
            if spent - at_four + slot.bytes <= budget:
                break
        else:
            slot.bits = 4
        spent += slot.bytes - at_four
    return slots


@torch.no_grad()
def expert_importance(model, tokenizer, sequences: int = 16, length: int = 128) -> dict:
    """{(layer index, expert): share of that layer's choices} on built-in English text
    (random token ids when the model has no tokenizer)."""
    from ..data import load_documents
    from .parity import ExpertUsage

    if tokenizer is not None:
        text = " ".join(load_documents("builtin:pydoc")[:200])
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        usable = min(sequences, len(ids) // length)
        batch = ids[: usable * length].reshape(usable, length)
    else:
        generator = torch.Generator().manual_seed(0)
        batch = torch.randint(0, model.config.vocab_size, (sequences, length), generator=generator)
    usage = ExpertUsage(model)
    try:
        for rows in batch.split(4):
            model(input_ids=rows)
    finally:
        usage.close()
    return usage.shares()


def quantize_experts(raw: Path, target_path: Path, model, tokenizer, budget_mb: float) -> dict:
    """Per-expert weight-only quantization (MatMulNBits, 4 or 8 bits, blocks of 32) of a raw
    gather-form graph; weights outside the experts stay fp32. Returns the per-expert report."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from ..refactor.moe import MoEFFN
    from .split_experts import split_expert_weights, stacked_expert_weights

    stacked, slots = stacked_expert_weights(model, banks=("experts",)), []
    shares = expert_importance(model, tokenizer)
    for moe in model.modules():
        if not isinstance(moe, MoEFFN):
            continue
        bank = moe.bank
        projections = 3 if bank.gate is not None else 2
        for expert, width in enumerate(bank.widths):
            slots.append(
                ExpertSlot(
                    moe.layer_index,
                    expert,
                    shares.get((moe.layer_index, expert), 0.0),
                    projections * width * bank.hidden,
                )
            )
    assign_bits(slots, budget_mb)
    bits_of = {(s.layer, s.expert): s.bits for s in slots}
    split = target_path.with_name(target_path.stem + ".split.onnx")
    matmuls = split_expert_weights(raw, split, set(stacked))
    if not matmuls:
        raise ExportError(
            "no expert weights were found to split; per-expert quantization needs the "
            "gather form of the MoE layers (moe_op: gather)"
        )
    onnx_model = onnx.load(str(split))
    by_bits: dict[int, list[str]] = {4: [], 8: []}
    for matmul, (stack, expert) in matmuls.items():
        bits = bits_of[(stacked[stack], expert)]
        if bits in by_bits:
            by_bits[bits].append(matmul)
    for bits, nodes in by_bits.items():
        if nodes:
            others = [n.name for n in onnx_model.graph.node if n.name not in set(nodes)]
            quantizer = MatMulNBitsQuantizer(  # (nodes_to_include alone does not restrict)
                onnx_model, bits=bits, block_size=32, is_symmetric=True, nodes_to_exclude=others
            )
            with quiet("onnxruntime.quantization.matmul_nbits_quantizer"):  # a line per node
                quantizer.process()
            onnx_model = quantizer.model.model
    onnx.save(
        onnx_model,
        str(target_path),
        save_as_external_data=True,
        location=target_path.name + ".data",
    )
    total = sum(s.bytes for s in slots) / 2**20
    return {
        "scheme": "per-expert weight-only (MatMulNBits, blocks of 32); other weights fp32",
        "budget_mb": budget_mb,
        "experts_mb": round(total, 3),
        "experts_fp32_mb": round(sum(s.params * 4 for s in slots) / 2**20, 3),
        "bits_histogram": {str(b): sum(s.bits == b for s in slots) for b in (4, 8, 32)},
        "experts": [
            {
                "layer": s.layer,
                "expert": s.expert,
                "importance": round(s.importance, 4),
                "bits": s.bits,
                "bytes": int(s.bytes),
            }
            for s in slots
        ],
    }
