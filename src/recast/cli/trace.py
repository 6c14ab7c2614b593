"""`recast trace`: record a pre-gating bundle's routing as a trace file."""

from __future__ import annotations

import argparse

from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "trace",
        parents=[common.overwrite("an existing trace file")],
        help="record a pre-gating bundle's routing on built-in text as a trace file",
        description="Route English text (Python's pydoc topics) through a pre-gating bundle's "
        "router and write the experts each step uses, per layer, as a recast-trace JSON file "
        "for `recast simulate`. Docs: docs/export.md.",
    )
    parser.add_argument("bundle", help="a pre-gating bundle directory")
    parser.add_argument("--out", required=True, help="trace file to write")
    parser.add_argument(
        "--sequences", type=common.positive_int, default=32, help="sequences of text"
    )
    parser.add_argument(
        "--length", type=common.positive_int, default=64, help="tokens per sequence"
    )
    parser.add_argument(
        "--batch", type=common.positive_int, default=8, help="sequences decoded together"
    )
    parser.add_argument(
        "--prefill", action="store_true", help="one step per batch (default: one per token)"
    )
    return parser


def run(args) -> int:
    from ..atomic import check_file
    from ..runtime import load
    from ..runtime.simulate import builtin_batches, trace_from_routes

    check_file(args.out, args.overwrite)  # before the routing work
    session = load(args.bundle, device="cpu")
    batches = builtin_batches(session, args.sequences, args.length, args.batch)
    trace = trace_from_routes(session, batches, decode=not args.prefill)
    trace.save(args.out, overwrite=args.overwrite)
    print(
        f"{args.out}: {len(trace.steps)} steps, {trace.layers} layers x {trace.experts} experts, "
        f"{trace.unique_per_step():.1f} distinct experts per step"
    )
    return 0
