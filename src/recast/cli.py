"""The `recast` command. Parses arguments and turns library errors into one-line messages with
exit code 2; all the work is done by the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recast",
        description="Convert pretrained dense transformers into Mixture-of-Experts models.",
        epilog="Recipes are documented in docs/recipes.md; examples live in recipes/.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = sub.add_parser(
        "convert",
        help="run a recipe: calibrate, split the FFNs into experts, evaluate, save",
        description="Run a conversion recipe and write the MoE model, its partition, the "
        "resolved recipe and a report to the output directory (exported/<name> by default). "
        "The output is written to a temporary directory and renamed at the end, so a failed "
        "run leaves nothing behind.",
    )
    convert.add_argument("recipe", help="recipe YAML file")
    convert.add_argument(
        "--out", help="output directory (default: output.dir, else exported/<name>)"
    )
    convert.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set experts.count=4 (repeatable)",
    )
    convert.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the resolved recipe; convert nothing",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output directory"
    )
    convert.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickle (.bin/.pt) checkpoints, loaded with torch.load(weights_only=True)",
    )
    convert.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run from its last recovery round checkpoint "
        "(kept in .<out>.recover/ beside the output until the run succeeds)",
    )
    convert.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")

    validate = sub.add_parser("validate", help="check recipes without running them")
    validate.add_argument("recipes", nargs="+", help="recipe YAML files")

    inspect = sub.add_parser(
        "inspect", help="parameters, active parameters per token, experts and their widths"
    )
    inspect.add_argument("path", help="a recast output directory or a dense checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--trust-pickle", action="store_true", help="allow pickle checkpoints")
    return parser


def _convert(args) -> int:
    from .pipeline import convert
    from .recipe import load_recipe

    if args.dry_run:
        print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
        return 0
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="recast: %(message)s", stream=sys.stderr)
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
    return 0


def _validate(args) -> int:
    from .recipe import load_recipe

    for path in args.recipes:
        recipe = load_recipe(path)
        print(
            f"{path}: ok ({recipe.name}: {recipe.experts.count} experts, {recipe.experts.strategy})"
        )
    return 0


def _inspect(args) -> int:
    from .inspect import describe, format_description

    description = describe(Path(args.path), trust_pickle=args.trust_pickle)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import transformers

    from .errors import RecastError

    # recast reports its own stages; transformers' per-file bars would only add noise.
    transformers.utils.logging.disable_progress_bar()

    try:
        return {"convert": _convert, "validate": _validate, "inspect": _inspect}[args.command](args)
    except RecastError as exc:
        if args.debug:
            raise
        print(f"recast: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("recast: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
