"""Quality benchmark: dense vs MoE fidelity and active FFN fraction, before and after recovery,
with the per-layer oracle router as the upper bound.

    python scripts/bench_quality.py                       # every recipe below
    python scripts/bench_quality.py --recipes readme-tiny --json out.json
    python scripts/bench_quality.py --sweep [--recovery]  # quality vs active FFN fraction

Each recipe runs through `recast.convert` (nothing saved); the same run's dense model is the
baseline, so every figure is a ratio or an agreement against it. Writes a JSON file and a PNG
of per-layer expert load (tokens per expert on held-out text).

Targets (issue 3), at active FFN fraction <= 0.5:
  trained tiny LM with the pre-gating router: perplexity ratio MoE / dense <= 1.10;
  all-MiniLM-L6-v2: embedding cosine >= 0.95 and Spearman of pairwise similarities >= 0.95.

`--sweep` (issue 16) converts the tiny LM and MiniLM at active FFN fractions of about 0.25,
0.35, 0.44, 0.5 and 0.75 (8 experts; top-k and the shared share chosen to land there) with
each method of SWEEP_METHODS (the two best routers, the oracle, and the two routers with a
rank-48 compensator for the experts they leave out: its parameters count as active, so those
points sit a little right of the others), and draws quality against active fraction, one line
per method.
With `--recovery` each conversion also runs its recipe's recovery (the figures before it come
from the same run); without, recovery is off. Targets with no recovery: tiny LM perplexity
ratio <= 1.15 at <= 0.44 active; MiniLM cosine >= 0.90 at <= 0.5; after recovery MiniLM cosine
and Spearman >= 0.95 at <= 0.5.
"""

from __future__ import annotations

import argparse
import json
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

# model -> (base recipe, quality metric); the sweep sums experts (`combine: sum`) and keeps the
# output in recast's format, which holds every router.
SWEEP_MODELS = {
    "tiny-lm": ("recipes/qwen2moe-tiny.yaml", "perplexity_ratio"),
    "minilm": ("recipes/minilm-layer.yaml", "cosine_mean"),
}
SWEEP_METHODS = {
    "cluster + trained gates": {"experts.strategy": "cluster", "router.kind": "layer"},
    "activation_rate + analytic": {
        "experts.strategy": "activation_rate",
        "router.kind": "analytic",
    },
    "per-layer oracle": {"experts.strategy": "activation_rate", "router.kind": "oracle"},
    "cluster + gates + compensator": {
        "experts.strategy": "cluster",
        "router.kind": "layer",
        "compensate.rank": 48,
    },
    "activation_rate + analytic + compensator": {
        "experts.strategy": "activation_rate",
        "router.kind": "analytic",
        "compensate.rank": 48,
    },
}
SWEEP_EXPERTS = 8
SWEEP_POINTS = {0.25: 1, 0.35: 1, 0.44: 2, 0.5: 2, 0.75: 4}  # active fraction -> top-k


def sweep_overrides(fraction: float, top_k: int, method: dict, recovery: bool) -> dict:
    """The recipe keys of one sweep point: shared s so that s + (1 - s) k / E = fraction."""
    routed = top_k / SWEEP_EXPERTS
    return {
        "experts.count": SWEEP_EXPERTS,
        "experts.top_k": top_k,
        "experts.shared": round((fraction - routed) / (1 - routed), 4),
        "experts.combine": "sum",
        "output.format": "recast",
        "export": None,
        **({} if recovery else {"recover.steps": 0}),
        **method,
    }


def run_sweep(
    models: list[str], fractions: list[str], methods: list[str], recovery: bool
) -> list[dict]:
    import recast

    points = []
    for model in models:
        recipe, metric = SWEEP_MODELS[model]
        for fraction in map(float, fractions):
            top_k = SWEEP_POINTS[fraction]
            for method in methods:
                keys = SWEEP_METHODS[method]
                print(f"sweep {model} {fraction} {method} ...", flush=True)
                started = time.perf_counter()
                result = recast.convert(
                    recipe,
                    overrides=[
                        f"{k}={'null' if v is None else v}"
                        for k, v in sweep_overrides(fraction, top_k, keys, recovery).items()
                    ],
                    save=False,
                    progress=False,
                )
                m, before = result.report.metrics, result.report.before_recovery
                keys_of = [metric, "similarity_spearman"] if metric == "cosine_mean" else [metric]
                points.append(
                    {
                        "model": model,
                        "method": method,
                        "target_fraction": fraction,
                        "active_ffn_fraction": m["active_ffn_fraction"],
                        "metric": metric,
                        "no_recovery": {k: (before or m)[k] for k in keys_of},
                        "recovery": {k: m[k] for k in keys_of} if recovery else {},
                        "router_recall": result.report.routing.get("mean_recall"),
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                )
                print(json.dumps(points[-1]), flush=True)
    return points


def sweep_table(points: list[dict]) -> str:
    headers = ["model", "method", "active FFN", "metric", "no recovery", "recovery", "recall", "s"]
    rows = []
    for p in points:
        for key, value in p["no_recovery"].items():
            after = p["recovery"].get(key)
            rows.append(
                [
                    p["model"],
                    p["method"],
                    f"{p['active_ffn_fraction']:.3f}",
                    key,
                    f"{value:.4f}",
                    "-" if after is None else f"{after:.4f}",
                    "-" if p["router_recall"] is None else f"{p['router_recall']:.3f}",
                    f"{p['seconds']:.0f}",
                ]
            )
    return _bench.format_table(headers, rows)


def plot_sweep(points: list[dict], path: Path) -> None:
    """Quality against active FFN fraction per model, one line per method (dashed: after
    recovery)."""
    plt = _bench.pyplot()
    if plt is None:
        return
    models = list(dict.fromkeys(p["model"] for p in points))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [p for p in points if p["model"] == model]
        metric = mine[0]["metric"]
        for i, method in enumerate(SWEEP_METHODS):
            line = sorted(
                (p for p in mine if p["method"] == method), key=lambda p: p["active_ffn_fraction"]
            )
            x = [p["active_ffn_fraction"] for p in line]
            color = f"C{i}"
            ax.plot(x, [p["no_recovery"][metric] for p in line], "o-", color=color, label=method)
            if any(p["recovery"] for p in line):
                ax.plot(
                    x,
                    [p["recovery"][metric] for p in line],
                    "s--",
                    color=color,
                    label=f"{method}, recovered",
                )
        ax.set_xlabel("active FFN fraction")
        ax.set_ylabel(metric.replace("_", " ") + (" (MoE / dense)" if "ratio" in metric else ""))
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Quality vs active FFN fraction (8 experts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


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


def chosen(listed: str, known: dict, what: str) -> list[str] | None:
    """The comma-separated names of `listed`, or None (with a message) if one is unknown."""
    names = [n for n in listed.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        print(
            f"bench_quality: unknown {what} {unknown[0]!r}; choose from {', '.join(known)}",
            file=sys.stderr,
        )
        return None
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipes", default=",".join(RECIPES), help=f"comma-separated, from: {', '.join(RECIPES)}"
    )
    parser.add_argument("--json", default="exported/bench/bench_quality.json")
    parser.add_argument("--png", default="exported/bench/bench_quality.png")
    parser.add_argument(
        "--sweep", action="store_true", help="quality vs active FFN fraction, per method"
    )
    parser.add_argument(
        "--models", default=",".join(SWEEP_MODELS), help="with --sweep: comma-separated"
    )
    parser.add_argument(
        "--recovery", action="store_true", help="with --sweep: also run each recipe's recovery"
    )
    parser.add_argument(
        "--methods",
        default=",".join(SWEEP_METHODS),
        help="with --sweep: comma-separated, from those above",
    )
    parser.add_argument(
        "--fractions",
        default=",".join(map(str, SWEEP_POINTS)),
        help="with --sweep: comma-separated active FFN fractions, from those above",
    )
    args = parser.parse_args(argv)
    if args.sweep:
        return sweep_main(args)
    names = chosen(args.recipes, RECIPES, "recipe")
    if names is None:
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


def sweep_main(args) -> int:
    models = chosen(args.models, SWEEP_MODELS, "model")
    if models is None:
        return 2
    if "tiny-lm" in models and not Path("exported/tiny-lm").exists():
        print(
            "bench_quality: exported/tiny-lm is missing; build it with python scripts/train_tiny_lm.py",
            file=sys.stderr,
        )
        return 2
    machine = _bench.machine()
    fractions = chosen(args.fractions, {str(f): f for f in SWEEP_POINTS}, "fraction")
    if fractions is None:
        return 2
    methods = chosen(args.methods, SWEEP_METHODS, "method")
    if methods is None:
        return 2
    points = run_sweep(models, fractions, methods, args.recovery)
    print(sweep_table(points))
    print(f"\nmachine: {_bench.machine_line(machine)}; date {_bench.today()}")
    json_path = args.json.replace(".json", "_sweep.json")
    png_path = args.png.replace(".png", "_sweep.png")
    _bench.write_json(json_path, {"machine": machine, "date": _bench.today(), "points": points})
    plot_sweep(points, Path(png_path))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
