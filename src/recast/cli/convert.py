"""`recast convert`: run a conversion recipe and save what it makes."""

from __future__ import annotations

import argparse
import os

from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        parents=[
            common.overwrite("a non-empty output directory"),
            common.trust_pickle(
                "allow pickle (.bin/.pt) checkpoints, loaded with torch.load(weights_only=True)"
            ),
            common.quiet("no progress bars or stage messages"),
        ],
        help="run a recipe: calibrate, split the FFNs into experts, evaluate, save",
        description="Run a conversion recipe and write the MoE model, its partition, the "
        "resolved recipe and a report to the output directory (exported/<name> by default). "
        "The output is written to a temporary directory and renamed at the end, so a failed "
        "run leaves nothing behind.",
    )
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument(
        "--out", help="output directory (default: output.dir, else exported/<name>)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set experts.count=4 (repeatable)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the resolved recipe; convert nothing",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run from its last recovery round checkpoint "
        "(kept in .<out>.recover/ beside the output until the run succeeds)",
    )
    return parser


def run(args) -> int:
    from ..pipeline import convert
    from ..recipe import load_recipe

    if args.dry_run:
        print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
        return 0
    if not args.quiet and os.environ.get("RANK", "0") == "0":  # under a launcher: once, by rank 0
        common.log_stages()
    result = convert(
        args.recipe,
        out=args.out,
        overrides=args.overrides,
        overwrite=args.overwrite,
        trust_pickle=args.trust_pickle,
        resume=args.resume,
        progress=not args.quiet,
    )
    if result.output_dir is not None:  # the main process, under a multi-process launch
        print(result.report.table())
        print(f"\nsaved to {result.output_dir}")
        if result.bundle_dir is not None:
            print(f"bundle (parity checked) in {result.bundle_dir}")
    return 0
