"""`recast validate`: check conversion and fusion recipes without running them."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "validate", help="check recipes (conversion or fusion) without running them"
    )
    parser.add_argument("recipes", nargs="+", help="recipe YAML files")
    return parser


def run(args) -> int:
    from ..fusion import FusionRecipe
    from ..recipe import Recipe, read_mapping, validated

    for path in args.recipes:
        data, origin, text = read_mapping(path, "name, model, experts")
        if "models" in data:  # a fusion recipe
            fusion = validated(FusionRecipe, data, origin, text)
            print(f"{path}: ok ({fusion.name}: fuses {', '.join(fusion.models)})")
            continue
        recipe = validated(Recipe, data, origin, text)
        print(
            f"{path}: ok ({recipe.name}: {recipe.experts.count} experts, {recipe.experts.strategy})"
        )
    return 0
