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
        "run leaves nothing behind. Checkpoints of 1 GiB and more are converted layer by "
        "layer (stream: in the recipe), holding one decoder layer in memory at a time.",
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
        help="continue a killed run: a streamed conversion at its first layer not done "
        "(.<out>.stream/), recovery from its last round checkpoint (.<out>.recover/); both "
        "are kept beside the output until the run succeeds",
    )
    parser.add_argument(
        "--shard-size",
        metavar="SIZE",
        help="split weights above SIZE into numbered safetensors shards with an index "
        "(e.g. 5GB, the default, or 500MB; sets output.shard_size)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="where a streamed conversion computes each layer (auto: cuda when there is "
        "one; sets stream.device)",
    )
    return parser


def run(args) -> int:
    from ..pipeline import convert
    from ..recipe import load_recipe

    overrides = [*args.overrides, *flag_overrides(args)]
    if args.dry_run:
        print(load_recipe(args.recipe, overrides).to_yaml(), end="")
        return 0
    if not args.quiet and os.environ.get("RANK", "0") == "0":  # under a launcher: once, by rank 0
        common.log_stages()
    result = convert(
        args.recipe,
        out=args.out,
        overrides=overrides,
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


def flag_overrides(args) -> list[str]:
    """The recipe keys that `--shard-size` and `--device` set (after any `--set`)."""
    out = []
    if args.shard_size is not None:
        out.append(f"output.shard_size={args.shard_size}")
    if args.device is not None:
        out.append(f"stream.device={args.device}")
    return out
