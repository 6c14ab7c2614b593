"""The speedup in a runtime recast did not write: a dense decoder and its MoE in llama.cpp.

Two dense Llama decoders: an FFN-heavy one with random weights (default hidden 1024, FFN 8192,
8 layers, vocab 32000) and the trained tiny LM of `scripts/train_tiny_lm.py` (hidden 256, FFN
768, 4 layers, vocab 4096). recast converts each into a Mixtral-layout MoE (8 experts, top-2)
and a Qwen2-MoE one (8 experts, top-1, plus a shared expert of 1/8 of the neurons, with
`combine: softmax_all`, the weighting llama.cpp's qwen2moe computes), and
`recast export --format gguf` writes every model at every `--quant` type, each run against
transformers by its parity gate. llama-cpp-python runs them with the same threads: prompt
processing and decode tokens/s, as ratios to the dense model, beside the FLOP-ideal ratio
(weight multiply-adds per token: attention projections, the active FFN, router, head).

Needs `make llama-cpp` (llama-cpp-python) and exported/tiny-lm. Run:

    python scripts/bench_downstream.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import _bench

ROOT = _bench.REPO / "exported" / "bench-downstream"
TINY_LM = _bench.REPO / "exported" / "tiny-lm"

# name -> (output.format, the recipe's experts section); (None, None): the dense model itself
MODELS = {
    "dense": (None, None),
    "mixtral 8x top-2": ("mixtral", {"count": 8, "top_k": 2, "shared": 0.0, "combine": "softmax"}),
    "qwen2_moe 8x top-1 + shared": (
        "qwen2_moe",
        {"count": 8, "top_k": 1, "shared": 0.125, "combine": "softmax_all"},
    ),
}

MEASURE = """
import time, numpy as np, llama_cpp
p = _bench.params()
n_ctx = len(p["prompt_ids"]) + p["decode"] + 8  # one batch for the prompt, a row per token
llm = llama_cpp.Llama(model_path=p["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=p["threads"],
                      n_threads_batch=p["threads"], verbose=False)
prompt = p["prompt_ids"]
llm.eval(prompt[:16]); llm.reset()  # warm up
start = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - start
token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
start = time.perf_counter()
for _ in range(p["decode"]):
    llm.eval([token])
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
decode = time.perf_counter() - start
_bench.emit({"prefill_tok_s": len(prompt) / prefill, "decode_tok_s": p["decode"] / decode})
"""


def random_checkpoint(directory: Path, args) -> Path:
    """A random FFN-heavy Llama with the tiny LM's tokenizer."""
    import torch
    import transformers

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=args.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(TINY_LM).save_pretrained(directory)
    return directory


def moe_checkpoint(dense: Path, out: Path, fmt: str, experts: dict) -> Path:
    import recast

    if (out / "config.json").exists():
        return out
    recipe = {
        "name": out.name,
        "model": str(dense),
        "calibration": {"samples": 32, "seq_len": 64},
        "experts": experts | {"strategy": "uniform"},
        "router": {"kind": "layer", "steps": 20},
        "evaluate": {"enabled": False},
        "output": {"format": fmt},
    }
    recast.convert(recipe, out=out, overwrite=True)
    return out


def gguf(checkpoint: Path, quant: str) -> tuple[Path, dict]:
    """The GGUF file and its parity record (written by `recast export --format gguf`)."""
    import recast

    target = checkpoint.with_name(f"{checkpoint.name}-{quant}.gguf")
    record = target.with_name(target.name + ".parity.json")
    if not record.exists():
        recast.export_gguf(str(checkpoint), target, quant, overwrite=True)
    return target, json.loads(record.read_text())


def prompt_tokens(checkpoint: Path, length: int) -> list[int]:
    """The first `length` token ids of the built-in English text."""
    import transformers

    from recast.data import load_documents

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer("\n".join(load_documents("builtin:pydoc")[:40]))["input_ids"]
    return ids[:length]


def ideal_macs(config: dict, experts: dict | None) -> float:
    """Weight multiply-adds per token of a Llama config with this experts section."""
    h, f = config["hidden_size"], config["intermediate_size"]
    attention = 4 * h * h
    if experts is None:
        ffn = 3 * h * f
    else:
        shared = experts["shared"]
        routed = (1 - shared) * f / experts["count"] * experts["top_k"]
        ffn = 3 * h * (shared * f + routed) + h * experts["count"]
    return config["num_hidden_layers"] * (attention + ffn) + h * config["vocab_size"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--quant", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3, help="runs per model; the median counts")
    parser.add_argument("--json", default=str(ROOT / "bench_downstream.json"))
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("bench_downstream: needs llama-cpp-python: make llama-cpp")
    if not (TINY_LM / "config.json").exists():
        sys.exit("bench_downstream: needs the tiny LM: make exported/tiny-lm")
    ROOT.mkdir(parents=True, exist_ok=True)
    bases = {"random": random_checkpoint(ROOT / "random", args), "tiny-lm": TINY_LM}
    results, rows = {}, []
    for base_name, dense in bases.items():
        config = json.loads((dense / "config.json").read_text())
        prompt_ids = prompt_tokens(dense, min(args.prompt, config["max_position_embeddings"] // 2))
        checkpoints = {
            name: dense
            if fmt is None
            else moe_checkpoint(dense, ROOT / f"{base_name}-{fmt}", fmt, experts)
            for name, (fmt, experts) in MODELS.items()
        }
        for quant in args.quant:
            base = None
            for name, (_, experts) in MODELS.items():
                print(f"  {base_name} {name} {quant}", file=sys.stderr)
                path, parity = gguf(checkpoints[name], quant)
                params = {
                    "gguf": str(path),
                    "prompt_ids": prompt_ids,
                    "decode": args.decode,
                    "threads": args.threads,
                }
                runs = [_bench.run_snippet(MEASURE, params) for _ in range(args.repeat)]
                r = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                base = base or r
                ideal = ideal_macs(config, None) / ideal_macs(config, experts)
                decode_ratio = r["decode_tok_s"] / base["decode_tok_s"]
                r.update(
                    ideal_speedup=ideal,
                    prefill_speedup=r["prefill_tok_s"] / base["prefill_tok_s"],
                    decode_speedup=decode_ratio,
                    decode_of_ideal=decode_ratio / ideal,
                    parity={k: parity[k] for k in ("metric", parity["metric"], "tolerance")},
                )
                results[f"{base_name} {name} {quant}"] = r
                rows.append(
                    [
                        base_name,
                        name,
                        quant,
                        f"{r['prefill_tok_s']:.0f}",
                        f"{r['decode_tok_s']:.1f}",
                        f"{r['prefill_speedup']:.2f}x",
                        f"{decode_ratio:.2f}x",
                        f"{ideal:.2f}x",
                        f"{decode_ratio / ideal:.2f}",
                        f"{parity[parity['metric']]:.2g}",
                    ]
                )
    headers = ["base", "model", "quant", "prefill tok/s", "decode tok/s", "prefill vs dense"]
    headers += ["decode vs dense", "FLOP-ideal", "decode / ideal", "GGUF parity"]
    print(_bench.format_table(headers, rows))
    info = _bench.machine()
    shape = {k: getattr(args, k) for k in ("hidden", "ffn", "layers", "vocab", "prompt", "decode")}
    data = {"machine": info, "date": _bench.today(), "threads": args.threads, "random": shape}
    _bench.write_json(args.json, {**data, "results": results})
    print(f"{_bench.machine_line(info)}\nwrote {args.json}")


if __name__ == "__main__":
    main()
