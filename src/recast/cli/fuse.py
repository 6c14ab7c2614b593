"""`recast fuse`: several models in one bundle, each weight stored once."""

from __future__ import annotations

import argparse

from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fuse",
        parents=common.bundle_writer(),
        help="fuse several models into one bundle: each weight stored once, shared work done once",
        description="Fuse the models a fusion recipe names (ONNX files, bundles, checkpoints) "
        "into one ONNX bundle whose outputs are named model/output: inputs that are the same "
        "tensor become one, identical weights are stored once, computation the models share "
        "runs once, parallel matmuls are merged. Every model's outputs are checked against "
        "the model run alone before the bundle is written. Docs: docs/fusion.md.",
    )
    parser.add_argument("recipe", help="fusion recipe YAML file")
    parser.add_argument(
        "--out", help="bundle directory (default: the recipe's dir, else exported/<name>)"
    )
    parser.add_argument("--png", help="also draw the fused DAG (ops coloured by model) to this PNG")
    return parser


def run(args) -> int:
    from ..fusion import fuse, load_fusion_recipe
    from ..runtime.fused import describe
    from ..runtime.manifest import read_manifest

    if not args.quiet:
        common.log_stages()
    recipe = load_fusion_recipe(args.recipe)
    out = fuse(
        recipe.entries(),
        args.out or recipe.out,
        shared_inputs=recipe.shared_inputs,
        target=recipe.target,
        skip=recipe.skip,
        overwrite=args.overwrite,
        png=args.png,
        trust_pickle=args.trust_pickle,
    )
    manifest = read_manifest(out, verify=False)
    parity = manifest["parity"]
    print(
        f"{out}: fused bundle of {', '.join(manifest['fusion']['models'])}; parity "
        f"{parity['metric']} {parity['max_error']:.2e} (tolerance {parity['tolerance']:g})"
    )
    print("\n".join(describe(manifest["fusion"])))
    return 0
