"""Bundles: graphs + tokenizer + recipe + `manifest.json`, written only if parity holds.

    exported/NAME/
      manifest.json        format and recast versions, kind, files (sha256, size), inputs and
                           outputs with dtypes and dynamic axes, routing, target, parity record,
                           resource profile (latency and memory against batch and length)
      model.onnx(.data)    the backbone (decoders: with past key/values in and out)
      router.onnx(.data)   pre-gating models: token ids -> expert ids and weights
      tokenizer.json ...   the source model's tokenizer
      recipe.yaml          the resolved recipe, when the model came from a conversion
      .recast-output       the marker of a directory recast wrote (see recast.atomic)

Everything is written to a staging directory; the parity gate runs the staged bundle with the
runtime against the torch model, and only a bundle that passes is renamed into place.

Graphs are standard ONNX unless quantized or lowered to onnxruntime's MoE kernel
(`recast.export.portable`); the manifest's `requires` says which runtime each one needs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx
import torch
from torch import nn

from ..atomic import atomic_directory
from ..errors import ExportError
from ..models.families import family_for
from ..refactor.moe import moe_layers
from ..runtime.experts import store_file
from ..runtime.manifest import BUNDLE_FORMAT_VERSION, file_records, write_manifest
from ..runtime.profile import measure_profile
from ..runtime.session import Session
from ..shards import write_file
from ..version import __version__
from .graphs import cache_shape, is_decoder, pregate_network, traceables
from .lowerings import contrib_supports
from .parity import check_parity
from .portable import required_runtime, save_graph
from .settings import ExportSpec, QuantizeSpec
from .split_experts import split_expert_weights, stacked_expert_weights

log = logging.getLogger("recast")


def export_bundle(
    model: nn.Module,
    out: str | Path,
    spec: ExportSpec | None = None,
    *,
    tokenizer=None,
    recipe_yaml: str | None = None,
    source: str = "<in-memory>",
    overwrite: bool = False,
    inputs: tuple[Path, ...] = (),
) -> Path:
    """Export `model` (dense or recast MoE, fp32) to a verified bundle at `out`; `inputs` are
    the paths it was read from (never written over)."""
    spec = spec or ExportSpec()
    model = model.eval()
    _check_exportable(model, spec)
    for moe in moe_layers(model):  # padded neurons: zero weights, so no mask is needed
        for bank in (moe.bank, moe.shared):
            if bank is not None:
                bank.zero_padding()
    out = Path(out)
    with atomic_directory(out, overwrite, inputs) as staging:
        # intermediate graphs (as big as the bundle) on the output's disk, not in /tmp
        work = staging / ".work"
        work.mkdir()
        graphs = _write_graphs(model, staging, work, spec, tokenizer)
        shutil.rmtree(work)
        if spec.offload:
            write_expert_store(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if recipe_yaml:
            (staging / "recipe.yaml").write_text(recipe_yaml)
        manifest = _manifest(model, spec, graphs, source)
        manifest["files"] = file_records(staging)
        write_manifest(staging, manifest)
        session = Session(staging, device=spec.target, verify=False)
        manifest["parity"] = check_parity(model, session, tokenizer)
        manifest["profile"] = measure_profile(session)
        write_manifest(staging, manifest)
    return out


def write_expert_store(model: nn.Module, staging: Path) -> None:
    """Every routed expert's weights, one safetensors file per layer, in the layout
    `recast.runtime.experts` reads (fc1 `[hidden, (2 x) width]`, fc2 `[width, hidden]`),
    written a tensor at a time: at most one layer's SwiGLU fc1 is built at once."""
    for moe in moe_layers(model):
        path = staging / store_file(moe.layer_index)
        path.parent.mkdir(exist_ok=True)
        write_file(path, _expert_tensors(moe.bank))


def _expert_tensors(bank) -> list[tuple[str, torch.Tensor]]:
    tensors = []
    for expert in range(bank.num):
        fc1 = (
            bank.up[expert]
            if bank.gate is None
            else torch.cat([bank.gate[expert], bank.up[expert]])
        )
        tensors += [
            (f"{expert}.fc1", fc1.detach().T),
            (f"{expert}.fc2", bank.down[expert].detach().T),
        ]
        if bank.up_bias is not None:
            bias = bank.up_bias[expert]
            if bank.gate_bias is not None:
                bias = torch.cat([bank.gate_bias[expert], bias])
            tensors.append((f"{expert}.fc1_bias", bias.detach()))
    return tensors


def _check_exportable(model: nn.Module, spec: ExportSpec) -> None:
    if next(model.parameters()).dtype != torch.float32:
        raise ExportError("export starts from fp32 weights; load the model with dtype float32")
    moe_op = spec.resolved_moe_op
    layers = moe_layers(model)
    if spec.offload:
        if pregate_network(model) is None or not is_decoder(model):
            raise ExportError(
                "offload needs a decoder with the pre-gating router (router.kind: pregate): "
                "its routes, known before the backbone runs, say which experts to load"
            )
        if layers[0].bank.up_bias is not None:
            raise ExportError("offload supports FFNs without biases (Llama, Mistral, Qwen2)")
    if layers and spec.format == "onnx" and moe_op == "contrib":
        if layers[0].combine == "softmax_all":
            raise ExportError(
                "onnxruntime's MoE kernel renormalises the selected experts' weights, which "
                "experts.combine softmax_all does not; use moe_op: gather"
            )
        bank = layers[0].bank
        if not contrib_supports(bank.activation, bank.gate is not None):
            raise ExportError(
                f"onnxruntime's MoE kernel has no {bank.activation!r} "
                f"{'SwiGLU' if bank.gate is not None else 'FFN'} here; use moe_op: gather"
            )
    if spec.target == "cuda":
        from .optimize import cuda_usable

        if not cuda_usable(spec.format):
            raise ExportError(
                "target cuda needs a usable CUDA device here: the bundle is optimized for it and "
                "its parity is checked on it; export with target cpu on this machine"
            )


def _write_graphs(model: nn.Module, staging: Path, work: Path, spec: ExportSpec, tokenizer) -> dict:
    graphs = {}
    for name, traceable in traceables(model, offload=spec.offload).items():
        compiled = None
        made = {}  # what the manifest records of the ONNX graph (fusions, quantization)
        log.info("exporting %s graph (%s)", name, spec.format)
        file = f"{name}.{'pt2' if spec.format == 'pt2' else 'onnx'}"
        if spec.format == "pt2":
            from .pt2 import export_pt2

            compiled = export_pt2(traceable, staging / file, compile=spec.compile)
            inputs, outputs = _pt2_io(traceable)
        else:
            from .onnx import export_onnx

            raw = export_onnx(
                traceable,
                work / f"{name}.raw.onnx",
                spec.resolved_moe_op,
                # per-expert quantization reads the expert weights out of the unfolded graph
                fold=not isinstance(spec.quantize, QuantizeSpec),
            )
            made = _final_graph(raw, staging / file, work, spec, name, model, tokenizer)
            inputs, outputs = onnx_io(staging / file)
        graphs[name] = {"file": file, "inputs": inputs, "outputs": outputs}
        if spec.format == "onnx":
            graphs[name]["requires"] = required_runtime(staging / file)
        if spec.format == "pt2" and compiled is not None:
            graphs[name]["compiled"] = compiled.name  # what the runtime runs
        graphs[name].update(made)
    return graphs


def _final_graph(
    raw: Path, final: Path, work: Path, spec: ExportSpec, name: str, model, tokenizer
) -> dict:
    """The raw graph at `final`, in the target's precision (fused or quantized, if asked);
    returns what the manifest records of it (`fusions`, `quantization`)."""
    if spec.target == "cuda":
        from .optimize import to_fp16

        raw = to_fp16(raw, work / f"{name}.fp16.onnx")
    if spec.quantize is None or name == "router":  # the router is tiny and decides routing
        stacked = set(stacked_expert_weights(model))
        # each expert's weight stored apart, so that opening the graph folds no copy of them
        if not spec.fused:  # standard ONNX: onnxruntime optimizes it when a session opens
            if not split_expert_weights(raw, final, stacked):
                save_graph(raw, final)
            return {}
        from .fusions import fuse_for_ort

        split = work / f"{name}.split.onnx"
        return {
            "fusions": fuse_for_ort(
                split if split_expert_weights(raw, split, stacked) else raw, final
            )
        }
    from .optimize import optimize
    from .quantize import quantize_int8, router_nodes

    quantized = work / f"{name}.quantized.onnx"
    if isinstance(spec.quantize, QuantizeSpec):
        from .quantize import quantize_experts

        report = quantize_experts(raw, quantized, model, tokenizer, spec.quantize.experts.budget_mb)
    else:
        folded = work / f"{name}.folded.onnx"
        optimize(raw, folded, spec.target, level="basic")  # folding exposes the weights
        report = quantize_int8(folded, quantized, keep_fp32=router_nodes(raw))
    optimize(quantized, final, spec.target)
    return {"quantization": report}


def onnx_io(path: Path) -> tuple[list[dict], list[dict]]:
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "dtype": dtype, "shape": dims}

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


def _pt2_io(traceable) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and named dynamic axes of the example inputs (the program's own)."""
    leaves = [a for a in torch.utils._pytree.tree_flatten(traceable.args)[0] if a is not None]
    inputs = [
        {
            "name": name,
            "dtype": str(value.numpy().dtype),
            "shape": [
                traceable.axis_names.get(name, {}).get(i, s) for i, s in enumerate(value.shape)
            ],
        }
        for name, value in zip(traceable.input_names, leaves, strict=True)
    ]
    outputs = [{"name": name, "dtype": "float32", "shape": None} for name in traceable.output_names]
    return inputs, outputs


def _manifest(model: nn.Module, spec: ExportSpec, graphs: dict, source: str) -> dict:

    config = model.config
    decoder = is_decoder(model)
    info = getattr(model, "recast", None)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = config.eos_token_id if eos is None else eos
    pad = config.pad_token_id
    model_info = {
        "family": family_for(config.model_type).name,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "max_positions": getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None),
        "eos_token_ids": [] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        "pad_token_id": 0 if pad is None else pad,
    }
    if decoder:
        shape = cache_shape(model)
        model_info["cache"] = {
            "layers": shape.layers,
            "heads": shape.heads,
            "head_dim": shape.head_dim,
        }
    network = pregate_network(model)
    if network is not None:
        router_cache = network.empty_cache(1)  # per block: (key, value) [1, heads, 0, dim]
        model_info["router_cache"] = {
            "layers": len(router_cache),
            "heads": router_cache[0][0].shape[1],
            "head_dim": router_cache[0][0].shape[3],
        }
    routing = None
    if info is not None:
        routing = {
            "experts": info.num_experts,
            "top_k": info.top_k,
            "combine": info.combine,
            "router": info.router,
            "pregate": pregate_network(model) is not None,
            "offload": spec.offload,  # experts are graph inputs, read from experts/
            "moe_op": spec.resolved_moe_op if spec.format == "onnx" else "recast::routed_experts",
            "expert_widths": info.expert_widths,
            # one (widest) expert's weights: what an expert cache loads per miss
            "expert_params": max(info.expert_widths)
            * config.hidden_size
            * (3 if moe_layers(model)[0].bank.gate is not None else 2),
            "shared_widths": info.shared_widths,
        }
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "recast_version": __version__,
        "artifact": spec.format,
        "kind": "decoder" if decoder else "encoder",
        "source": source,
        "target": spec.target,
        "precision": _precision(spec),
        "export": spec.model_dump(mode="json"),
        "model": model_info,
        "routing": routing,
        "graphs": graphs,
        "files": {},
        "parity": None,
    }


def _precision(spec: ExportSpec) -> str:
    if spec.target == "cuda":
        return "fp16"
    if spec.quantize == "int8":
        return "int8"
    return "mixed" if spec.quantize is not None else "fp32"
