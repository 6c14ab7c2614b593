"""Serving benchmark: experts resident vs offloaded behind a bounded cache; FCFS vs
expert-aware batching.

    python scripts/bench_serving.py              # builds the model and bundles on first run
    python scripts/bench_serving.py --new-tokens 64 --json out.json

Model: a Llama-style decoder whose experts dominate its size (hidden 768, FFN 8192, 4 layers,
random weights) converted to 16 experts of 512 neurons per layer, top-2, with the pre-gating
router trained on the tiny LM's tokenizer and text: 64 experts of 4.5 MiB, 288 MiB of
experts. Exported twice: resident (the baseline of every ratio) and `offload: true`.

Part 1, offload. Each configuration runs in a fresh process: load the bundle, greedy-decode
`--new-tokens` tokens after each of 8 text prompts of 64 tokens (Python's pydoc topics), one
after another; report prefill and decode tokens/s, the expert cache's hit rate, bytes loaded
and stall time, and peak RSS above what the imports left resident. Caches of 100%, 50% and 25%
of the experts, per policy, with and without prefetch; `cold` runs drop evicted experts from
the OS page cache too, so a miss reads the disk.

Part 2, batching. 32 requests (prompts of 32 tokens from different pydoc topics, 16 new
tokens each) arrive as a Poisson stream; the offload bundle with half its experts cached
(Belady) serves them in batches of up to 4, formed first-come-first-served or expert-aware.

Targets (issue 5): at 50% cached, Belady's hit rate >= LRU's + 10 points and decode tokens/s
>= 0.7x fully resident; peak RSS lower by at least the bytes of the experts not cached.
"""

from __future__ import annotations

import argparse
import sys
import time

import _bench

ROOT = _bench.REPO / "exported" / "bench" / "serving"
TOKENIZER = _bench.REPO / "exported" / "tiny-lm"
DECODER = dict(
    vocab_size=4096,
    hidden_size=768,
    intermediate_size=8192,
    num_hidden_layers=4,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
MOE = dict(experts=16, top_k=2, shared=0.0, strategy="cluster", samples=64, seq_len=128)

# Peak RSS above what the imports left resident (recast imports torch where it is installed,
# which would dwarf the differences measured here).
OFFLOAD = """
    import numpy as np, recast.runtime
    meter = _bench.StageMeter()
    p = _bench.params()
    with meter.stage("serve"):
        session = recast.runtime.load(p["bundle"], device="cpu", threads=2, **p["options"])
        session.model_info["eos_token_ids"] = []  # decode every token
        prompts = [np.array([ids]) for ids in p["prompts"]]
        session.generate(prompts[0][:, :8], max_new_tokens=2)  # warm-up
        if session.experts is not None:
            session.experts.reset_stats()
        prefill = decode = steps = 0
        for prompt in prompts:
            session.generate(prompt, max_new_tokens=p["new_tokens"])
            prefill += session.timings["prefill_seconds"]
            decode += session.timings["decode_seconds"]
            steps += session.timings["decode_steps"]
    tokens = sum(prompt.shape[1] for prompt in prompts)
    result = {"prefill_tokens_per_s": tokens / prefill, "decode_tokens_per_s": steps / decode}
    if session.experts is not None:
        result.update(session.stats())
    stage = meter.stages[0]
    result["peak_rss"] = stage["peak"] - stage["rss_before"]
    _bench.emit(result)
"""

BATCHING = """
    import numpy as np, recast.runtime
    from recast.runtime.schedule import Request, Scheduler, poisson_arrivals, serve
    p = _bench.params()
    session = recast.runtime.load(p["bundle"], device="cpu", threads=2, **p["options"])
    session.model_info["eos_token_ids"] = []
    session.generate(np.array([p["prompts"][0][:8]]), max_new_tokens=2)  # warm-up
    arrivals = poisson_arrivals(len(p["prompts"]), p["rate"], seed=1)
    requests = [
        Request(np.array(ids), p["new_tokens"], arrival, i)
        for i, (ids, arrival) in enumerate(zip(p["prompts"], arrivals))
    ]
    report = serve(session, requests, Scheduler(p["policy"], p["max_batch"]))
    result = report.summary()
    if session.experts is not None:
        result.update(session.stats())
    _bench.emit(result)
"""


def build() -> tuple[str, str, int, int]:
    """The resident and offload bundles (exported on first use); (resident, offload, experts,
    bytes per expert)."""
    import torch
    import transformers

    import recast
    from recast.models.load import load_dense
    from recast.runtime.experts import ExpertStore

    if not TOKENIZER.exists():
        raise SystemExit("run `make exported/tiny-lm` first (its tokenizer calibrates the MoE)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    dense_dir, model_dir = ROOT / "dense-checkpoint", ROOT / "moe-model"
    if not (dense_dir / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**DECODER)
        dense = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        dense.save_pretrained(dense_dir)
        tokenizer.save_pretrained(dense_dir)
    if not (model_dir / "config.json").exists():
        moe = recast.refactor(
            load_dense(str(dense_dir)).model,
            tokenizer=tokenizer,
            router="pregate",
            router_options={"steps": 40},
            progress=False,
            **MOE,
        )
        recast.save(moe, model_dir)
    bundles = {"resident": {}, "offload": {"offload": True}}
    for name, spec in bundles.items():
        if not (ROOT / name / "manifest.json").exists():
            started = time.perf_counter()
            recast.export(recast.load(model_dir), ROOT / name, spec, tokenizer=tokenizer)
            print(f"  exported {name} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    store = ExpertStore(ROOT / "offload")
    experts = len(store.layers) * recast.runtime.load(ROOT / "offload").routing["experts"]
    return str(ROOT / "resident"), str(ROOT / "offload"), experts, store.nbytes(0, 0)


def text_prompts(count: int, length: int, stride: int = 1) -> list[list[int]]:
    """`count` prompts of `length` tokens, each from its own pydoc topic (every `stride`-th)."""
    from pydoc_data.topics import topics

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    prompts = []
    for text in list(topics.values())[::stride]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"pydoc has fewer than {count} topics of {length} tokens")


def offload_runs(resident: str, offload: str, experts: int) -> list[tuple[str, str, dict]]:
    runs = [("resident", resident, {})]
    for fraction in (1.0, 0.5, 0.25):
        cache = max(1, round(experts * fraction))
        for policy in ("lru", "lfu", "belady") if fraction < 1 else ("lru",):
            runs.append((f"{fraction:.0%} {policy}", offload, {"cache": cache, "policy": policy}))
    half = {"cache": experts // 2}
    runs += [
        ("50% belady, no prefetch", offload, {**half, "policy": "belady", "prefetch": False}),
        ("50% lru, cold", offload, {**half, "policy": "lru", "cold": True}),
        ("50% belady, cold", offload, {**half, "policy": "belady", "cold": True}),
        (
            "50% belady, cold, no prefetch",
            offload,
            {**half, "policy": "belady", "cold": True, "prefetch": False},
        ),
    ]
    return runs


def offload_table(results: dict) -> str:
    base = results["resident"]
    rows = [
        [
            name,
            f"{r['prefill_tokens_per_s']:.0f}",
            f"{r['decode_tokens_per_s']:.1f}",
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x",
            "-" if "hit_rate" not in r else f"{r['hit_rate']:.3f}",
            "-" if "bytes_loaded" not in r else _bench.mb(r["bytes_loaded"]),
            "-" if "stall_seconds" not in r else f"{r['stall_seconds']:.2f}",
            _bench.mb(r["peak_rss"]),
            f"{(base['peak_rss'] - r['peak_rss']) / 2**20:+.0f}",
        ]
        for name, r in results.items()
    ]
    headers = [
        "run",
        "prefill tok/s",
        "decode tok/s",
        "decode vs resident",
        "hit rate",
        "MiB loaded",
        "stall s",
        "peak RSS MiB",
        "RSS saved MiB",
    ]
    return _bench.format_table(headers, rows)


def batching_table(results: dict) -> str:
    base = results["fcfs"]
    rows = [
        [
            name,
            f"{r['experts_per_batch']:.1f}",
            f"{r['hit_rate']:.3f}",
            f"{r['p50_ms']:.0f}",
            f"{r['p95_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
        ]
        for name, r in results.items()
    ]
    headers = [
        "batching",
        "experts/batch",
        "hit rate",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "tokens/s",
        "vs fcfs",
    ]
    return _bench.format_table(headers, rows)


def plot(results: dict, experts: int, path) -> None:
    plt = _bench.pyplot()
    fig, (hits, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in ("lru", "lfu", "belady"):
        points = [(1.0, "100% lru")] if policy == "lru" else []
        points += [(f, f"{f:.0%} {policy}") for f in (0.5, 0.25)]
        xs = [f for f, name in points if name in results]
        hits.plot(
            xs, [results[n]["hit_rate"] for _, n in points if n in results], "o-", label=policy
        )
        speed.plot(
            xs,
            [results[n]["decode_tokens_per_s"] for _, n in points if n in results],
            "o-",
            label=policy,
        )
    speed.axhline(
        results["resident"]["decode_tokens_per_s"], color="grey", ls="--", label="resident"
    )
    hits.set(xlabel="fraction of experts cached", ylabel="hit rate", title="expert cache hit rate")
    speed.set(xlabel="fraction of experts cached", ylabel="decode tokens/s", title="decode speed")
    for ax in (hits, speed):
        ax.legend()
    fig.suptitle(f"offloaded experts ({experts} experts)")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=20.0, help="request arrivals per second")
    parser.add_argument("--json", default=str(ROOT / "bench_serving.json"))
    args = parser.parse_args()
    resident, offload, experts, expert_bytes = build()
    prompts = text_prompts(8, 64)
    results = {}
    for name, bundle, options in offload_runs(resident, offload, experts):
        print(f"  measuring {name}", file=sys.stderr)
        params = {"bundle": bundle, "options": options, "prompts": prompts}
        results[name] = _bench.run_snippet(OFFLOAD, {**params, "new_tokens": args.new_tokens})
    print(offload_table(results))
    uncached = experts * expert_bytes / 2**20
    print(
        f"\n{experts} experts of {expert_bytes / 2**20:.1f} MiB ({uncached:.0f} MiB); uncached: "
        f"{uncached / 2:.0f} MiB at 50%, {uncached * 3 / 4:.0f} MiB at 25%\n"
    )
    stream = text_prompts(32, 32, stride=2)
    batching = {}
    for policy in ("fcfs", "experts"):
        print(f"  serving with {policy} batching", file=sys.stderr)
        params = {
            "bundle": offload,
            "options": {"cache": experts // 2, "policy": "belady"},
            "prompts": stream,
            "new_tokens": 16,
            "rate": args.rate,
            "policy": policy,
            "max_batch": 4,
        }
        batching[policy] = _bench.run_snippet(BATCHING, params)
    print(batching_table(batching))
    png = ROOT / "bench_serving.png"
    plot(results, experts, png)
    info = _bench.machine()
    data = {"machine": info, "date": _bench.today(), "offload": results, "batching": batching}
    _bench.write_json(args.json, data)
    print(f"{_bench.machine_line(info)}\nwrote {args.json} and {png}")


if __name__ == "__main__":
    main()
