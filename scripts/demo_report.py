"""The end of `make demo`: the two numbers that say whether the demo's MoE is worth keeping,
then the bundles timed side by side.

    python scripts/demo_report.py exported/quickstart exported/minilm-onnx exported/quickstart-onnx

Prints, first, the MoE's mean embedding cosine to the dense model on held-out text (from the
conversion's report.json) and the MoE bundle's speedup over the dense bundle at batch 1 x 64,
each against its target (issue 16: cosine >= 0.95, speedup >= 1.25x), then the bench table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COSINE_TARGET = 0.95
SPEEDUP_TARGET = 1.25


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "missed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="the conversion's output dir (report.json)")
    parser.add_argument("dense", help="the dense model's bundle (the baseline)")
    parser.add_argument("moe", help="the MoE's bundle")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)

    from recast.runtime.bench import compare, format_comparison

    report = json.loads((args.output / "report.json").read_text())
    cosine = report["metrics"]["cosine_mean"]
    rows = compare([args.dense, args.moe], 1, args.length, 0, args.repeat)
    speedup = rows[0]["prefill"]["p50_ms"] / rows[1]["prefill"]["p50_ms"]
    print(
        f"embedding cosine to the dense model   {cosine:.3f}  "
        f"(target >= {COSINE_TARGET}: {verdict(cosine, COSINE_TARGET)})"
    )
    print(
        f"MoE bundle speedup at 1 x {args.length:<10} {speedup:.2f}x  "
        f"(target >= {SPEEDUP_TARGET}x: {verdict(speedup, SPEEDUP_TARGET)}; "
        f"active FFN fraction {report['metrics']['active_ffn_fraction']:.3f})"
    )
    print()
    print(format_comparison(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
