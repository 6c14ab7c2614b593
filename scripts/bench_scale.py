"""Conversion at the sizes people have: random-weight Llama checkpoints from 0.5B to 8B.

Each checkpoint is written in bf16 (one shard per layer and an index, as the Hub has them;
the Llama-3-8B shape at 8B with a 32000-token vocab to save disk) with a tokenizer trained on
the built-in text, then `recast convert` runs a fixed recipe (8 experts top-2, 25% shared,
`cluster`, layer gates, no recovery) in a fresh process. The table gives per-stage seconds,
the calibrate stage's tokens/s (calibration and evaluation tokens through the dense layers)
and its FLOP-bound time (those multiply-adds at the fp32 matmul rate measured here), peak RSS
against the target (one decoder layer in fp32 + the layer-input cache + 1.5 GiB), and the disk
the run needs; time and memory are fitted against parameters and extrapolated to a 70B model
(Llama-3-70B's shape), whose memory target is also computed from its layer. `--whole 0.5B` also converts that size
in memory as before (`stream.enabled: false`, `stream.layer_inputs: dense` for the streamed
one) and compares the two outputs' logits.

    python scripts/bench_scale.py --sizes 0.5B,1.2B,3B,8B
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import _bench

ROOT = _bench.REPO / "exported" / "bench-scale"
GIB = 1 << 30

# name -> (hidden, FFN, layers, attention heads, KV heads)
SHAPES = {
    "0.5B": (1536, 6144, 16, 12, 4),
    "1.2B": (2048, 8192, 16, 16, 8),
    "3B": (3072, 8192, 28, 24, 8),
    "8B": (4096, 14336, 32, 32, 8),
}
VOCAB = 32000
LLAMA_70B = (8192, 28672, 80, 64, 8)  # extrapolated to, not built


def recipe(name: str, model: Path, samples: int, seq_len: int, **stream) -> dict:
    return {
        "name": name,
        "model": str(model),
        "calibration": {"samples": samples, "seq_len": seq_len, "batch_size": 8},
        "experts": {"count": 8, "top_k": 2, "shared": 0.25, "strategy": "cluster"},
        "router": {"kind": "layer", "steps": 200},
        "evaluate": {"samples": 8, "seq_len": seq_len},
        "stream": stream,
    }


MAKE_CHECKPOINT = """
import json, torch, transformers
from pathlib import Path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from recast.data import load_documents
from recast.shards import INDEX_FILE, write_file

p = _bench.params()
out = Path(p["dir"])
out.mkdir(parents=True)
hidden, ffn, layers, heads, kv = p["shape"]
config = transformers.LlamaConfig(
    vocab_size=p["vocab"], hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
    num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
    tie_word_embeddings=False, dtype="bfloat16",
)
config.save_pretrained(out)
generator = torch.Generator().manual_seed(0)

def tensor(shape, norm=False):
    if norm:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

head = hidden // heads
weight_map = {}
def write(name, tensors):
    write_file(out / name, list(tensors.items()))
    weight_map.update(dict.fromkeys(tensors, name))
write("model-outer.safetensors", {
    "model.embed_tokens.weight": tensor((p["vocab"], hidden)),
    "model.norm.weight": tensor((hidden,), True),
    "lm_head.weight": tensor((p["vocab"], hidden)),
})
for i in range(layers):
    pre = f"model.layers.{i}."
    write(f"model-layer-{i:03d}.safetensors", {
        pre + "input_layernorm.weight": tensor((hidden,), True),
        pre + "post_attention_layernorm.weight": tensor((hidden,), True),
        pre + "self_attn.q_proj.weight": tensor((heads * head, hidden)),
        pre + "self_attn.k_proj.weight": tensor((kv * head, hidden)),
        pre + "self_attn.v_proj.weight": tensor((kv * head, hidden)),
        pre + "self_attn.o_proj.weight": tensor((hidden, heads * head)),
        pre + "mlp.gate_proj.weight": tensor((ffn, hidden)),
        pre + "mlp.up_proj.weight": tensor((ffn, hidden)),
        pre + "mlp.down_proj.weight": tensor((hidden, ffn)),
    })
(out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train_from_iterator(load_documents("builtin:pydoc")[:400], trainer)
transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>", unk_token="<unk>").save_pretrained(out)
_bench.emit({})
"""

CONVERT = """
import json, time
import recast
p = _bench.params()
started = time.perf_counter()
result = recast.convert(p["recipe"], out=p["out"], progress=False)
seconds = time.perf_counter() - started
_bench.emit({"seconds": seconds, "peak_rss": _bench.peak_rss_bytes(),
             "report": json.loads((result.output_dir / "report.json").read_text())})
"""

COMPARE = """
import torch, recast
from pathlib import Path
from recast.shards import Checkpoint
p = _bench.params()
whole, streamed = Checkpoint(Path(p["whole"])), Checkpoint(Path(p["streamed"]))
exact, worst = 0, 0.0
for name in streamed.names:
    a, b = streamed.get(name), whole.get(name)
    exact += bool(torch.equal(a, b.to(a.dtype)))
    worst = max(worst, float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)))
ids = torch.randint(4, 4000, (2, 48), generator=torch.Generator().manual_seed(0))
out = {}
for name in ("whole", "streamed"):
    model = recast.load(p[name], dtype=torch.float32)
    with torch.no_grad():
        out[name] = model(input_ids=ids).logits
    del model
diff = (out["whole"] - out["streamed"]).abs()
_bench.emit({"tensors": len(streamed.names), "tensors_equal_in_bf16": exact,
             "tensors_same_names": sorted(whole.names) == sorted(streamed.names),
             "max_relative_tensor_diff": worst, "max_abs_diff": float(diff.max()),
             "max_abs_logit": float(out["whole"].abs().max()),
             "top1_agreement": float((out["whole"].argmax(-1) == out["streamed"].argmax(-1)).float().mean())})
"""

LOAD = """
import time, torch, recast
p = _bench.params()
started = time.perf_counter()
model = recast.load(p["dir"], dtype="auto")
loaded = time.perf_counter() - started
ids = torch.randint(4, 4000, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(input_ids=ids).logits
_bench.emit({"load_seconds": loaded, "dtype": str(next(model.parameters()).dtype),
             "finite": bool(torch.isfinite(logits).all()), "peak_rss": _bench.peak_rss_bytes()})
"""

MATMUL_RATE = """
import time, torch
a, b = torch.randn(2048, 4096), torch.randn(4096, 4096)
a @ b
started = time.perf_counter()
for _ in range(5):
    a @ b
seconds = (time.perf_counter() - started) / 5
_bench.emit({"flops": 2 * 2048 * 4096 * 4096 / seconds, "threads": torch.get_num_threads()})
"""


def parameter_count(shape: tuple[int, ...]) -> int:
    hidden, ffn, layers, heads, kv = shape
    head = hidden // heads
    attention = hidden * head * (2 * heads + 2 * kv)
    return layers * (attention + 3 * hidden * ffn + 2 * hidden) + 2 * VOCAB * hidden + hidden


def layer_fp32_bytes(shape: tuple[int, ...]) -> int:
    hidden, ffn, layers, heads, kv = shape
    head = hidden // heads
    return 4 * (hidden * head * (2 * heads + 2 * kv) + 3 * hidden * ffn + 2 * hidden)


def cache_bytes(shape: tuple[int, ...], tokens: int, eval_tokens: int) -> int:
    """The layer-input cache in memory at once: every calibration and evaluation token's
    FFN input (fp32), held while the layer's gate trains and its routing is measured."""
    return 4 * shape[0] * (tokens + eval_tokens)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return slope, my - slope * mx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="0.5B,1.2B,3B,8B", help="comma-separated, of " + ", ".join(SHAPES)
    )
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--whole", default="0.5B", help="size also converted whole-model ('' for none)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    parser.add_argument("--json", default=str(ROOT / "bench_scale.json"))
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown size {unknown[0]}; choose from {', '.join(SHAPES)}")
    ROOT.mkdir(parents=True, exist_ok=True)
    rate = _bench.run_snippet(MATMUL_RATE)
    rows, results = [], []
    for size in sizes:
        shape = SHAPES[size]
        checkpoint = ROOT / f"llama-{size}"
        if not checkpoint.exists():
            started = time.perf_counter()
            _bench.run_snippet(
                MAKE_CHECKPOINT, {"dir": str(checkpoint), "shape": shape, "vocab": VOCAB}
            )
            print(
                f"{size}: checkpoint written in {time.perf_counter() - started:.0f} s",
                file=sys.stderr,
            )
        out = ROOT / f"moe-{size}"
        shutil.rmtree(out, ignore_errors=True)
        run = _bench.run_snippet(
            CONVERT,
            {
                "recipe": recipe(
                    f"scale-{size}",
                    checkpoint,
                    args.samples,
                    args.seq_len,
                    enabled=True,
                    layer_inputs="dense" if size == args.whole else "moe",
                ),
                "out": str(out),
            },
        )
        report = run["report"]["metrics"]
        tokens = report["streamed"]["calibration_tokens"]
        eval_tokens = report["streamed"]["evaluation_tokens"]
        params = parameter_count(shape)
        stages = report["stage_seconds"]
        # The calibrate stage runs every calibration and evaluation token through the dense
        # layers: its multiply-adds at the fp32 matmul rate measured here.
        limit = (
            2 * (layer_fp32_bytes(shape) // 4) * shape[2] * (tokens + eval_tokens) / rate["flops"]
        )
        target = layer_fp32_bytes(shape) + cache_bytes(shape, tokens, eval_tokens) + 1.5 * GIB
        loaded = _bench.run_snippet(LOAD, {"dir": str(out)})
        result = {
            "size": size,
            "params": params,
            "shape": shape,
            "checkpoint_bytes": _bench.weight_bytes(checkpoint) or directory_bytes(checkpoint),
            "output_bytes": directory_bytes(out),
            "seconds": run["seconds"],
            "peak_rss": run["peak_rss"],
            "peak_rss_stage": report.get("peak_rss_stage"),
            "target_rss": target,
            "stages": stages,
            "calibration_tokens": tokens,
            "evaluation_tokens": eval_tokens,
            "flop_bound_seconds": limit,
            "perplexity_ratio": report.get("perplexity_ratio"),
            "load": loaded,
        }
        if size == args.whole:
            whole = ROOT / f"moe-{size}-whole"
            shutil.rmtree(whole, ignore_errors=True)
            whole_run = _bench.run_snippet(
                CONVERT,
                {
                    "recipe": recipe(
                        f"scale-{size}-whole", checkpoint, args.samples, args.seq_len, enabled=False
                    ),
                    "out": str(whole),
                },
            )
            result["whole"] = {
                "seconds": whole_run["seconds"],
                "peak_rss": whole_run["peak_rss"],
                **_bench.run_snippet(COMPARE, {"whole": str(whole), "streamed": str(out)}),
            }
            if not args.keep:
                shutil.rmtree(whole, ignore_errors=True)
        results.append(result)
        calibrate = stages.get("calibrate", 0.0)
        rows.append(
            [
                size,
                f"{params / 1e9:.2f}",
                f"{result['checkpoint_bytes'] / GIB:.2f}",
                f"{run['peak_rss'] / GIB:.2f}",
                report.get("peak_rss_stage", "-"),
                f"{target / GIB:.2f}",
                f"{run['seconds']:.0f}",
                f"{stages.get('read', 0):.0f}",
                f"{calibrate:.0f}",
                f"{stages.get('partition', 0):.0f}",
                f"{stages.get('router', 0):.0f}",
                f"{stages.get('propagate', 0):.0f}",
                f"{stages.get('write', 0) + stages.get('pack', 0):.0f}",
                f"{(tokens + eval_tokens) / calibrate:.0f}" if calibrate else "-",
                f"{limit:.0f}",
                f"{(result['checkpoint_bytes'] + 2 * result['output_bytes']) / GIB:.1f}",
            ]
        )
        print(
            f"{size}: {run['seconds']:.0f} s, peak {run['peak_rss'] / GIB:.2f} GiB", file=sys.stderr
        )
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(_bench.machine_line(_bench.machine()), f"fp32 matmul {rate['flops'] / 1e9:.0f} GFLOP/s")
    print(
        _bench.format_table(
            [
                "size",
                "params (B)",
                "ckpt GiB",
                "peak GiB",
                "peak in",
                "target GiB",
                "total s",
                "read s",
                "calibrate s",
                "partition s",
                "router s",
                "propagate s",
                "write s",
                "dense tok/s",
                "FLOP-bound s",
                "disk GiB",
            ],
            rows,
        )
    )
    for r in results:
        if "whole" in r:
            w = r["whole"]
            print(
                f"\n{r['size']} whole-model: {w['seconds']:.0f} s, peak {w['peak_rss'] / GIB:.2f} GiB "
                f"({w['peak_rss'] / r['peak_rss']:.2f}x the streamed); streamed (dense layer inputs) "
                f"tensors equal to the whole-model ones rounded to bf16: {w['tensors_equal_in_bf16']} of "
                f"{w['tensors']} (max relative diff {w['max_relative_tensor_diff']:.1e}); logits max |diff| "
                f"{w['max_abs_diff']:.2e} of max |logit| {w['max_abs_logit']:.2f}, top-1 agreement "
                f"{w['top1_agreement']:.2%}"
            )
    if len(results) > 1:
        xs = [r["params"] / 1e9 for r in results]
        t_slope, t_zero = fit(xs, [r["seconds"] for r in results])
        m_slope, m_zero = fit(xs, [r["peak_rss"] / GIB for r in results])
        print(
            f"\nfit: time {t_zero:.0f} s + {t_slope:.0f} s per B params -> 70B {t_zero + 70 * t_slope:.0f} s; "
            f"peak {m_zero:.2f} GiB + {m_slope:.3f} GiB per B params -> 70B {m_zero + 70 * m_slope:.1f} GiB"
        )
        tokens = results[-1]["calibration_tokens"]
        big = layer_fp32_bytes(LLAMA_70B) + cache_bytes(LLAMA_70B, tokens, tokens // 2) + 1.5 * GIB
        print(f"70B (Llama-3-70B shape): memory target by its layer {big / GIB:.1f} GiB")
    _bench.write_json(
        args.json,
        {
            "date": _bench.today(),
            "machine": _bench.machine(),
            "matmul_flops": rate["flops"],
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
