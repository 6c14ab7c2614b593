"""`recast export`: a parity-checked bundle (ONNX or pt2) of a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import RecipeError
from . import common

# `--format gguf --quantize TYPE` (recast.export.llama_cpp.GGUF_TYPES, named here so that
# --help does not import torch; tests/test_gguf.py checks the two agree).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        parents=common.bundle_writer(),
        help="export a model to a bundle (ONNX or pt2) or a GGUF file that passed the parity gate",
        description="Export a recast output or a dense checkpoint to a bundle: graphs, "
        "tokenizer and a manifest with checksums and the parity record. The bundle is run "
        "against the torch model on several shapes before it is written; on a mismatch "
        "nothing is written. --format gguf writes one GGUF file for llama.cpp instead (dense "
        "Llama, Mistral, Qwen2, GPT-2 and the mixtral / qwen2_moe outputs), run in llama.cpp "
        "against transformers before it is written, with its parity record beside it as "
        "FILE.gguf.parity.json. Docs: docs/export.md.",
    )
    parser.add_argument(
        "model", help="recast output dir, dense checkpoint dir, package:<module> or hub id"
    )
    parser.add_argument(
        "--out", required=True, help="bundle directory to write (gguf: the .gguf file)"
    )
    parser.add_argument("--format", choices=["onnx", "pt2", "gguf"], default="onnx")
    parser.add_argument(
        "--target",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: fp16 weights, optimized and checked on onnxruntime's CUDA provider",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8", *GGUF_TYPES],
        metavar="TYPE",
        help="onnx: int8 (dynamic quantization of matmul weights, cpu). gguf: the file type, "
        f"one of {', '.join(GGUF_TYPES)} (default f16; the K-quants are made by llama.cpp)",
    )
    parser.add_argument(
        "--expert-budget-mb",
        type=float,
        metavar="MB",
        help="per-expert bitwidths (4/8/32) chosen by importance so experts fit in MB (cpu)",
    )
    parser.add_argument(
        "--moe-op",
        choices=["auto", "gather", "contrib"],
        default="auto",
        help="how MoE layers lower to ONNX (auto: gather on cpu, contrib on cuda)",
    )
    parser.add_argument(
        "--graph",
        choices=["auto", "fused", "portable"],
        default="auto",
        help="onnx: fused (onnxruntime's attention, layer-norm and gelu kernels; the default "
        "unless quantized) or portable (standard ONNX only, for any ONNX runtime)",
    )
    parser.add_argument("--compile", action="store_true", help="pt2: add an AOTInductor package")
    parser.add_argument(
        "--offload",
        action="store_true",
        help="experts outside the graph, fed from a bounded cache (pre-gating decoders)",
    )
    parser.add_argument(
        "--no-parity",
        action="store_true",
        help="gguf: write the file without running it in llama.cpp (when llama-cpp-python is "
        "not installed; the parity record then says it was not checked)",
    )
    return parser


def run(args) -> int:
    if args.format == "gguf":
        return _run_gguf(args)
    if args.quantize in GGUF_TYPES or args.no_parity:
        given = "--no-parity" if args.no_parity else f"--quantize {args.quantize}"
        raise RecipeError(f"{given} is for --format gguf; ONNX bundles take --quantize int8")
    from ..export import export
    from ..runtime.manifest import pin_line, read_manifest

    if not args.quiet:
        common.log_stages()
    spec = dict(
        format=args.format,
        target=args.target,
        quantize=_quantize_setting(args),
        moe_op=args.moe_op,
        graph=args.graph,
        compile=args.compile,
        offload=args.offload,
    )
    out = export(
        args.model, args.out, spec, overwrite=args.overwrite, trust_pickle=args.trust_pickle
    )
    manifest = read_manifest(out, verify=False)
    parity = manifest["parity"]
    size = sum(f["size"] for f in manifest["files"].values()) / 2**20
    print(
        f"{out}: {manifest['kind']} {manifest['artifact']} bundle, {manifest['precision']}, "
        f"{size:.1f} MiB; parity {parity['metric']} {parity['max_error']:.2e} "
        f"(tolerance {parity['tolerance']:g}) over {len(parity['cases'])} cases"
    )
    print(pin_line(out))
    return 0


def _run_gguf(args) -> int:
    from ..export.llama_cpp import export_gguf

    bundle_only = {
        "--target cuda": args.target != "cpu",
        "--quantize int8": args.quantize == "int8",
        "--expert-budget-mb": args.expert_budget_mb is not None,
        "--moe-op": args.moe_op != "auto",
        "--graph": args.graph != "auto",
        "--compile": args.compile,
        "--offload": args.offload,
    }
    for flag, given in bundle_only.items():
        if given:
            raise RecipeError(f"{flag} is for ONNX and pt2 bundles, not --format gguf")
    if not args.quiet:
        common.log_stages()
    record = export_gguf(
        args.model,
        args.out,
        args.quantize or "f16",
        parity=not args.no_parity,
        overwrite=args.overwrite,
        trust_pickle=args.trust_pickle,
        progress=not args.quiet,
    )
    size = Path(args.out).stat().st_size / 2**20
    if record.get("checked") is False:
        check = "not run in llama.cpp (--no-parity)"
    else:
        check = (
            f"llama.cpp parity {record['metric']} {record[record['metric']]:.4g} "
            f"(tolerance {record['tolerance']:g})"
        )
    print(f"{args.out}: GGUF {record['type']}, {size:.1f} MiB; {check}")
    return 0


def _quantize_setting(args):
    if args.quantize and args.expert_budget_mb is not None:
        raise RecipeError("give --quantize int8 or --expert-budget-mb, not both")
    if args.expert_budget_mb is not None:  # 0 too: the schema refuses it (it is not "none")
        return {"experts": {"budget_mb": args.expert_budget_mb}}
    return args.quantize
