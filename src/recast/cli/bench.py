"""`recast bench`: time bundles side by side."""

from __future__ import annotations

import argparse
import json

from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        parents=[common.device(), common.json_output()],
        help="prefill latency percentiles and decode tokens/s of one or more bundles",
        description="Time bundles side by side with recast's runtime; the first bundle is "
        "the baseline of the speedup column.",
    )
    parser.add_argument("bundles", nargs="+", help="bundle directories")
    parser.add_argument("--batch", type=common.positive_int, default=1)
    parser.add_argument("--length", type=common.positive_int, default=64, help="prompt tokens")
    parser.add_argument(
        "--new-tokens", type=common.non_negative_int, default=32, help="decoded tokens (decoders)"
    )
    parser.add_argument("--repeat", type=common.positive_int, default=20)
    parser.add_argument("--threads", type=common.positive_int, help="onnxruntime intra-op threads")
    return parser


def run(args) -> int:
    from ..runtime.bench import compare, format_comparison

    sizes = (args.batch, args.length, args.new_tokens, args.repeat)
    rows = compare(args.bundles, *sizes, device=args.device, threads=args.threads)
    print(json.dumps(rows, indent=2) if args.json else format_comparison(rows))
    return 0
