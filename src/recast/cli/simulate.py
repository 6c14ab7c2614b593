"""`recast simulate`: replay a routing trace through expert caches."""

from __future__ import annotations

import argparse
import json

from ..errors import TraceError
from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate",
        parents=[common.overwrite("an existing --png"), common.json_output()],
        help="replay a routing trace through expert caches: hit rate per policy and size",
        description="Replay a recast-trace file through an expert cache for each policy and "
        "capacity (in experts) and print hit rates, misses and bytes loaded; Belady's "
        "policy (which knows the future) bounds the others.",
    )
    parser.add_argument("trace_file", metavar="trace", help="a recast-trace JSON file")
    parser.add_argument(
        "--policy", default="lru,lfu,belady", help="comma-separated policies (lru, lfu, belady)"
    )
    parser.add_argument(
        "--cache",
        default=None,
        help="comma-separated capacities in experts (default: 1/8, 1/4, 1/2 and 3/4 of all)",
    )
    parser.add_argument("--png", help="write a chart of hit rate against cache size")
    return parser


def run(args) -> int:
    from ..atomic import check_file
    from ..runtime.simulate import Trace, format_sweep, hit_rate_chart, sweep

    if args.png:
        check_file(args.png, args.overwrite, suffix=".png")  # before the simulation
    trace = Trace.load(args.trace_file)
    total = trace.layers * trace.experts
    try:
        capacities = (
            [int(c) for c in args.cache.split(",")]
            if args.cache
            else sorted({max(1, total * n // 8) for n in (1, 2, 4, 6)})
        )
    except ValueError:
        raise TraceError(f"--cache takes comma-separated integers, got {args.cache!r}") from None
    rows = sweep(trace, [policy.strip() for policy in args.policy.split(",")], capacities)
    if args.png:
        hit_rate_chart(rows, total, args.png, args.overwrite)
    if args.json:
        print(json.dumps({"unique_experts_per_step": trace.unique_per_step(), "results": rows}))
        return 0
    print(format_sweep(trace, rows))
    return 0
