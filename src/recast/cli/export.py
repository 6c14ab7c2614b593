"""`recast export`: a parity-checked bundle (ONNX or pt2) of a model."""

from __future__ import annotations

import argparse

from ..errors import RecipeError
from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        parents=common.bundle_writer(),
        help="export a model to a bundle (ONNX or pt2) that passed the parity gate",
        description="Export a recast output or a dense checkpoint to a bundle: graphs, "
        "tokenizer and a manifest with checksums and the parity record. The bundle is run "
        "against the torch model on several shapes before it is written; on a mismatch "
        "nothing is written. Docs: docs/export.md.",
    )
    parser.add_argument(
        "model", help="recast output dir, dense checkpoint dir, package:<module> or hub id"
    )
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    parser.add_argument(
        "--target",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: fp16 weights, optimized and checked on onnxruntime's CUDA provider",
    )
    parser.add_argument(
        "--quantize", choices=["int8"], help="int8 dynamic quantization of matmul weights (cpu)"
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
    parser.add_argument("--compile", action="store_true", help="pt2: add an AOTInductor package")
    parser.add_argument(
        "--offload",
        action="store_true",
        help="experts outside the graph, fed from a bounded cache (pre-gating decoders)",
    )
    return parser


def run(args) -> int:
    from ..export import export
    from ..runtime.manifest import pin_line, read_manifest

    if not args.quiet:
        common.log_stages()
    spec = dict(
        format=args.format,
        target=args.target,
        quantize=_quantize_setting(args),
        moe_op=args.moe_op,
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


def _quantize_setting(args):
    if args.quantize and args.expert_budget_mb is not None:
        raise RecipeError("give --quantize int8 or --expert-budget-mb, not both")
    if args.expert_budget_mb is not None:  # 0 too: the schema refuses it (it is not "none")
        return {"experts": {"budget_mb": args.expert_budget_mb}}
    return args.quantize
