"""Quality benchmark: dense vs MoE fidelity and active FFN fraction, before and after recovery,
with the per-layer oracle router as the upper bound.

    python scripts/bench_quality.py                       # every recipe below
    python scripts/bench_quality.py --recipes readme-tiny --json out.json

Each recipe runs through `recast.convert` (nothing saved); the same run's dense model is the
baseline, so every figure is a ratio or an agreement against it. Writes a JSON file and a PNG
of per-layer expert load (tokens per expert on held-out text).

Targets (issue 3), at active FFN fraction <= 0.5:
  trained tiny LM with the pre-gating router: perplexity ratio MoE / dense <= 1.10;
  all-MiniLM-L6-v2: embedding cosine >= 0.95 and Spearman of pairwise similarities >= 0.95.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _bench

RECIPES = {
    "readme-tiny": ("recipes/readme-tiny.yaml", "perplexity_ratio", "<=", 1.10),
    "mixtral-tiny": ("recipes/mixtral-tiny.yaml", "perplexity_ratio", None, None),
    "qwen2moe-tiny": ("recipes/qwen2moe-tiny.yaml", "perplexity_ratio", None, None),
    "minilm-layer": ("recipes/minilm-layer.yaml", "cosine_mean", ">=", 0.95),
}
SECOND_METRIC = {"cosine_mean": ("similarity_spearman", ">=", 0.95)}


def _met(value: float, op: str | None, target: float | None) -> str:
    if op is None:
        return "-"
    return "yes" if (value <= target if op == "<=" else value >= target) else "NO"


def run_recipe(name: str, path: str) -> dict:
    import recast

    started = time.perf_counter()
    result = recast.convert(path, save=False, progress=False)
    report = result.report.to_json()
    report["wall_seconds"] = time.perf_counter() - started
    report["recipe_name"] = name
    return report


def rows_for(name: str, report: dict) -> list[list[str]]:
    _, metric, op, target = RECIPES[name]
    m, before = report["metrics"], report["before_recovery"]
    checks = [(metric, op, target)]
    if metric in SECOND_METRIC:
        checks.append(SECOND_METRIC[metric])
    rows = []
    for key, key_op, key_target in checks:
        after = m[key]
        rows.append(
            [
                name,
                report["router"],
                f"{m['active_ffn_fraction']:.3f}",
                key,
                f"{before[key]:.4f}" if key in before else "-",
                f"{after:.4f}",
                f"{m['oracle_' + key]:.4f}" if "oracle_" + key in m else "-",
                f"{key_op} {key_target}" if key_op else "-",
                _met(after, key_op, key_target),
            ]
        )
    return rows


def plot_loads(reports: list[dict], path: Path) -> None:
    plt = _bench.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(reports), figsize=(4.5 * len(reports), 3.6), squeeze=False)
    for ax, report in zip(axes[0], reports, strict=True):
        load = report["routing"]["expert_load"]
        image = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set_title(f"{report['recipe_name']} ({report['router']})", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label="tokens routed")
    fig.suptitle("Per-layer expert load on held-out text")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipes", default=",".join(RECIPES), help=f"comma-separated, from: {', '.join(RECIPES)}"
    )
    parser.add_argument("--json", default="exported/bench/bench_quality.json")
    parser.add_argument("--png", default="exported/bench/bench_quality.png")
    args = parser.parse_args(argv)
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(
            f"bench_quality: unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}",
            file=sys.stderr,
        )
        return 2
    missing = [
        RECIPES[n][0] for n in names if "tiny" in n and not Path("exported/tiny-lm").exists()
    ]
    if missing:
        print(
            "bench_quality: exported/tiny-lm is missing; build it with python scripts/train_tiny_lm.py",
            file=sys.stderr,
        )
        return 2
    machine = _bench.machine()
    reports = []
    for name in names:
        print(f"running {name} ...", flush=True)
        reports.append(run_recipe(name, RECIPES[name][0]))
    headers = [
        "recipe",
        "router",
        "active FFN",
        "metric",
        "before recovery",
        "after",
        "oracle router",
        "target",
        "met",
    ]
    rows = [row for report in reports for row in rows_for(report["recipe_name"], report)]
    print(_bench.format_table(headers, rows))
    print(f"\nmachine: {_bench.machine_line(machine)}; date {_bench.today()}")
    for report in reports:
        r = report["routing"]
        print(
            f"{report['recipe_name']}: router recall {r['mean_recall']:.3f}, load CV {r['mean_load_cv']:.3f}, "
            f"oracle cross-layer top-1 agreement {r['oracle_top1_agreement']:.3f}, "
            f"router {report['metrics']['router_params']:,} params, "
            f"{report['metrics']['router_compute_share']:.2%} of per-token compute, "
            f"{report['wall_seconds']:.0f} s"
        )
    _bench.write_json(args.json, {"machine": machine, "date": _bench.today(), "reports": reports})
    plot_loads(reports, Path(args.png))
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
