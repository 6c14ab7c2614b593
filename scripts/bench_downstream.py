"""The speedup in a runtime recast did not write: a dense decoder and its MoE in llama.cpp.

An FFN-heavy Llama decoder (random weights; default hidden 1024, FFN 8192, 8 layers, vocab
32000) is converted by recast into a Mixtral-layout MoE (8 experts, top-2) and a Qwen2-MoE one
(8 experts, top-1, plus a shared expert of 1/8 of the neurons). llama.cpp's own converter makes
a GGUF of each at every `--quant` type, and llama-cpp-python runs them with the same threads:
prompt processing and decode tokens/s, as ratios to the dense model, beside the FLOP-ideal
ratio (weight multiply-adds per token: attention projections, the active FFN, router, head).

Needs `make llama-cpp` (llama-cpp-python and llama.cpp's source tree). Run:

    python scripts/bench_downstream.py --tokenizer exported/tiny-lm
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import _bench

ROOT = _bench.REPO / "exported" / "bench-downstream"
LLAMA_CPP = _bench.REPO / ".cache" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
CONVERT = _bench.HERE / "llama_cpp_convert.py"

# name -> the recipe's experts section (None: the dense model itself)
MODELS = {
    "dense": None,
    "mixtral 8x top-2": {"count": 8, "top_k": 2, "shared": 0.0, "format": "mixtral"},
    "qwen2_moe 8x top-1 + shared": {
        "count": 8,
        "top_k": 1,
        "shared": 0.125,
        "format": "qwen2_moe",
    },
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


def dense_checkpoint(directory: Path, args) -> Path:
    """A random FFN-heavy Llama with the tokenizer of `args.tokenizer`."""
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
    transformers.AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(directory)
    return directory


def moe_checkpoint(dense: Path, name: str, experts: dict) -> Path:
    import recast

    out = ROOT / name.split()[0]
    if (out / "config.json").exists():
        return out
    recipe = {
        "name": name.split()[0],
        "model": str(dense),
        "calibration": {"samples": 32, "seq_len": 64},
        "experts": {k: v for k, v in experts.items() if k != "format"}
        | {"strategy": "uniform", "combine": "softmax"},
        "router": {"kind": "layer", "steps": 20},
        "evaluate": {"enabled": False},
        "output": {"format": experts["format"]},
    }
    recast.convert(recipe, out=out, overwrite=True)
    return out


def gguf(checkpoint: Path, quant: str) -> Path:
    target = checkpoint.with_name(f"{checkpoint.name}-{quant}.gguf")
    if not target.exists():
        converter = str(LLAMA_CPP / "convert_hf_to_gguf.py")
        command = [sys.executable, str(CONVERT), converter, str(checkpoint)]
        command += ["--outfile", str(target), "--outtype", quant]
        subprocess.run(command, check=True, capture_output=True)
    return target


def prompt_tokens(checkpoint: Path, length: int) -> list[int]:
    """The first `length` token ids of the built-in English text."""
    import transformers

    from recast.data import load_documents

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer("\n".join(load_documents("builtin:pydoc")[:40]))["input_ids"]
    return ids[:length]


def ideal_macs(args, experts: dict | None) -> float:
    """Weight multiply-adds per token."""
    h, f = args.hidden, args.ffn
    attention = 4 * h * h
    if experts is None:
        ffn = 3 * h * f
    else:
        shared = experts["shared"]
        routed = (1 - shared) * f / experts["count"] * experts["top_k"]
        ffn = 3 * h * (shared * f + routed) + h * experts["count"]
    return args.layers * (attention + ffn) + h * args.vocab


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", default=str(_bench.REPO / "exported" / "tiny-lm"))
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
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").exists():
        sys.exit(
            "bench_downstream: needs llama.cpp's source tree and llama-cpp-python: make llama-cpp"
        )
    ROOT.mkdir(parents=True, exist_ok=True)
    dense = dense_checkpoint(ROOT / "dense", args)
    checkpoints = {
        name: dense if experts is None else moe_checkpoint(dense, name, experts)
        for name, experts in MODELS.items()
    }
    prompt_ids = prompt_tokens(dense, args.prompt)
    results, rows = {}, []
    for quant in args.quant:
        for name, checkpoint in checkpoints.items():
            print(f"  {name} {quant}", file=sys.stderr)
            params = {
                "gguf": str(gguf(checkpoint, quant)),
                "prompt_ids": prompt_ids,
                "decode": args.decode,
                "threads": args.threads,
            }
            runs = [_bench.run_snippet(MEASURE, params) for _ in range(args.repeat)]
            results[f"{name} {quant}"] = {
                key: statistics.median(run[key] for run in runs) for key in runs[0]
            }
        base = results[f"dense {quant}"]
        for name, experts in MODELS.items():
            r = results[f"{name} {quant}"]
            ideal = ideal_macs(args, None) / ideal_macs(args, experts)
            decode_ratio = r["decode_tok_s"] / base["decode_tok_s"]
            r.update(
                ideal_speedup=ideal,
                prefill_speedup=r["prefill_tok_s"] / base["prefill_tok_s"],
                decode_speedup=decode_ratio,
                decode_of_ideal=decode_ratio / ideal,
            )
            rows.append(
                [
                    name,
                    quant,
                    f"{r['prefill_tok_s']:.0f}",
                    f"{r['decode_tok_s']:.1f}",
                    f"{r['prefill_speedup']:.2f}x",
                    f"{decode_ratio:.2f}x",
                    f"{ideal:.2f}x",
                    f"{decode_ratio / ideal:.2f}",
                ]
            )
    headers = ["model", "quant", "prefill tok/s", "decode tok/s", "prefill vs dense"]
    headers += ["decode vs dense", "FLOP-ideal", "decode / ideal"]
    print(_bench.format_table(headers, rows))
    info = _bench.machine()
    shape = {k: getattr(args, k) for k in ("hidden", "ffn", "layers", "vocab", "prompt", "decode")}
    data = {"machine": info, "date": _bench.today(), "threads": args.threads, "shape": shape}
    _bench.write_json(args.json, {**data, "results": results})
    print(f"{_bench.machine_line(info)}\nwrote {args.json}")


if __name__ == "__main__":
    main()
