"""Serving benchmark: experts resident vs offloaded behind a bounded cache, per policy.

    python scripts/bench_serving.py              # needs scripts/bench_export.py run first
    python scripts/bench_serving.py --new-tokens 64 --json out.json

Model: bench_export.py's pre-gating decoder (hidden 512, 4 layers x 8 experts of 512 neurons,
top-2; 3 MiB per expert, 96 MiB of experts). Each configuration runs in a fresh process: load the
bundle, greedy-decode `--new-tokens` tokens after a 64-token prompt for 4 sequences one after
another, and report decode tokens/s, the expert cache's hit rate and bytes loaded, and peak
RSS above what the imports left resident. The resident bundle is the baseline of the ratios.

Targets (issue 5): at 50% cached, Belady's hit rate >= LRU's + 10 points and decode tokens/s
>= 0.7x fully resident; peak RSS lower by at least the bytes of the experts not cached.
"""

from __future__ import annotations

import argparse
import sys

import _bench

ROOT = _bench.REPO / "exported" / "bench" / "export"
MODEL = ROOT / "decoder-moe-pregate-model"

# Peak RSS above what the imports left resident (recast imports torch where it is installed,
# which would dwarf the differences measured here).
SNIPPET = """
    import time, numpy as np, recast.runtime
    meter = _bench.StageMeter()
    p = _bench.params()
    options = {} if p["cache"] is None else {"cache": p["cache"], "policy": p["policy"]}
    with meter.stage("serve"):
        session = recast.runtime.load(p["bundle"], device="cpu", threads=2, **options)
        rng = np.random.default_rng(0)
        vocab = session.model_info["vocab_size"]
        prompts = [rng.integers(0, vocab, (1, 64)) for _ in range(4)]
        session.model_info["eos_token_ids"] = []  # decode every token
        session.generate(prompts[0], max_new_tokens=2)
        start = time.perf_counter()
        for prompt in prompts:
            session.generate(prompt, max_new_tokens=p["new_tokens"])
        seconds = time.perf_counter() - start
    result = {"tokens_per_s": len(prompts) * p["new_tokens"] / seconds}
    if session.experts is not None:
        result.update(session.stats())
    stage = meter.stages[0]
    result["peak_rss"] = stage["peak"] - stage["rss_before"]
    _bench.emit(result)
"""


def build() -> tuple[str, str, int, int]:
    import recast
    from recast.runtime.experts import ExpertStore

    if not (MODEL / "config.json").exists():
        raise SystemExit("run scripts/bench_export.py first (it builds the pre-gating model)")
    resident, offload = ROOT / "decoder-moe-pregate", ROOT / "decoder-moe-pregate-offload"
    if not (offload / "manifest.json").exists():  # random prompts: no tokenizer needed
        recast.export(recast.load(MODEL), offload, {"offload": True})
    store = ExpertStore(offload)
    experts = len(store.layers) * recast.runtime.load(offload, verify=False).routing["experts"]
    return str(resident), str(offload), experts, store.nbytes(0, 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", default=str(ROOT / "bench_serving.json"))
    args = parser.parse_args()
    resident, offload, experts, expert_bytes = build()
    runs = [("resident", resident, None, None)]
    for fraction in (1.0, 0.5, 0.25):
        for policy in ("lru", "lfu", "belady"):
            cache = max(1, round(experts * fraction))
            runs.append((f"offload {fraction:.0%} {policy}", offload, cache, policy))
    results = {}
    for name, bundle, cache, policy in runs:
        print(f"  measuring {name}", file=sys.stderr)
        params = {"bundle": bundle, "cache": cache, "policy": policy, "new_tokens": args.new_tokens}
        results[name] = _bench.run_snippet(SNIPPET, params)
    base = results["resident"]
    rows = [
        [
            name,
            f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
            "-" if "hit_rate" not in r else f"{r['hit_rate']:.3f}",
            "-" if "bytes_loaded" not in r else _bench.mb(r["bytes_loaded"], 1),
            _bench.mb(r["peak_rss"]),
            f"{(base['peak_rss'] - r['peak_rss']) / 2**20:+.0f}",
        ]
        for name, r in results.items()
    ]
    print(
        _bench.format_table(
            [
                "run",
                "decode tok/s",
                "vs resident",
                "hit rate",
                "MiB loaded",
                "peak RSS MiB (serving)",
                "RSS saved MiB",
            ],
            rows,
        )
    )
    print(
        f"\n{experts} experts of {expert_bytes / 2**20:.1f} MiB; 50% uncached = "
        f"{experts // 2 * expert_bytes / 2**20:.0f} MiB, 75% = {experts * 3 // 4 * expert_bytes / 2**20:.0f} MiB"
    )
    info = _bench.machine()
    _bench.write_json(args.json, {"machine": info, "date": _bench.today(), "results": results})
    print(f"{_bench.machine_line(info)}\nwrote {args.json}")


if __name__ == "__main__":
    main()
