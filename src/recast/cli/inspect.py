"""`recast inspect`: describe a recast output, a dense checkpoint or a bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..markers import MANIFEST
from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        parents=[
            common.json_output("print JSON instead of a table"),
            common.expect_sha256(),
            common.trust_pickle(),
        ],
        help="parameters, active parameters per token, experts and their widths",
    )
    parser.add_argument(
        "path", help="a recast output, a dense checkpoint directory or an exported bundle"
    )
    return parser


def run(args) -> int:
    path = Path(args.path)
    if (path / MANIFEST).is_file():  # a bundle: its manifest, checksums verified
        from ..runtime.describe import summary
        from ..runtime.manifest import read_manifest

        manifest = read_manifest(path, expect_sha256=args.expect_sha256)
        print(json.dumps(manifest, indent=2) if args.json else summary(path, manifest))
        return 0

    from ..inspect import describe, format_description

    description = describe(path, trust_pickle=args.trust_pickle)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0
