"""The `recast` command. Parses arguments and turns library errors into one-line messages with
exit code 2; all the work is done by the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

EXIT_USAGE = 2
EXIT_BUG = 1
EXPECT_SHA256_HELP = (
    "refuse the bundle unless its manifest.json has this sha256 (printed by recast export and "
    "recast inspect); the manifest's checksums then pin every file"
)


def _number(kind: type, accepts, meaning: str):
    """An argparse `type=` that refuses, as a usage error, values outside `accepts`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {meaning}, got {text!r}") from None
        if not accepts(value):  # nan fails every comparison, so every check refuses it
            raise argparse.ArgumentTypeError(f"expected {meaning}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v > 0, "a whole number > 0")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a finite number > 0")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recast",
        description="Convert pretrained dense transformers into Mixture-of-Experts models, "
        "export them to bundles and run them.",
        epilog="Recipes are documented in docs/recipes.md; examples live in recipes/.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = sub.add_parser(
        "convert",
        help="run a recipe: calibrate, split the FFNs into experts, evaluate, save",
        description="Run a conversion recipe and write the MoE model, its partition, the "
        "resolved recipe and a report to the output directory (exported/<name> by default). "
        "The output is written to a temporary directory and renamed at the end, so a failed "
        "run leaves nothing behind.",
    )
    convert.add_argument("recipe", help="recipe YAML file")
    convert.add_argument(
        "--out", help="output directory (default: output.dir, else exported/<name>)"
    )
    convert.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set experts.count=4 (repeatable)",
    )
    convert.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the resolved recipe; convert nothing",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output directory"
    )
    convert.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickle (.bin/.pt) checkpoints, loaded with torch.load(weights_only=True)",
    )
    convert.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run from its last recovery round checkpoint "
        "(kept in .<out>.recover/ beside the output until the run succeeds)",
    )
    convert.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")

    validate = sub.add_parser(
        "validate", help="check recipes (conversion or fusion) without running them"
    )
    validate.add_argument("recipes", nargs="+", help="recipe YAML files")

    inspect = sub.add_parser(
        "inspect", help="parameters, active parameters per token, experts and their widths"
    )
    inspect.add_argument(
        "path", help="a recast output, a dense checkpoint directory or an exported bundle"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--expect-sha256", metavar="HEX", help=EXPECT_SHA256_HELP)
    inspect.add_argument("--trust-pickle", action="store_true", help="allow pickle checkpoints")

    export = sub.add_parser(
        "export",
        help="export a model to a bundle (ONNX or pt2) that passed the parity gate",
        description="Export a recast output or a dense checkpoint to a bundle: graphs, "
        "tokenizer and a manifest with checksums and the parity record. The bundle is run "
        "against the torch model on several shapes before it is written; on a mismatch "
        "nothing is written. Docs: docs/export.md.",
    )
    export.add_argument(
        "model", help="recast output dir, dense checkpoint dir, package:<module> or hub id"
    )
    export.add_argument("--out", required=True, help="bundle directory to write")
    export.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    export.add_argument(
        "--target",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: fp16 weights, optimized and checked on onnxruntime's CUDA provider",
    )
    export.add_argument(
        "--quantize", choices=["int8"], help="int8 dynamic quantization of matmul weights (cpu)"
    )
    export.add_argument(
        "--expert-budget-mb",
        type=float,
        metavar="MB",
        help="per-expert bitwidths (4/8/32) chosen by importance so experts fit in MB (cpu)",
    )
    export.add_argument(
        "--moe-op",
        choices=["auto", "gather", "contrib"],
        default="auto",
        help="how MoE layers lower to ONNX (auto: gather on cpu, contrib on cuda)",
    )
    export.add_argument("--compile", action="store_true", help="pt2: add an AOTInductor package")
    export.add_argument(
        "--offload",
        action="store_true",
        help="experts outside the graph, fed from a bounded cache (pre-gating decoders)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    export.add_argument("--trust-pickle", action="store_true", help="allow pickle checkpoints")
    export.add_argument("--quiet", action="store_true", help="no stage messages")

    fuse = sub.add_parser(
        "fuse",
        help="fuse several models into one bundle: each weight stored once, shared work done once",
        description="Fuse the models a fusion recipe names (ONNX files, bundles, checkpoints) "
        "into one ONNX bundle whose outputs are named model/output: inputs that are the same "
        "tensor become one, identical weights are stored once, computation the models share "
        "runs once, parallel matmuls are merged. Every model's outputs are checked against "
        "the model run alone before the bundle is written. Docs: docs/fusion.md.",
    )
    fuse.add_argument("recipe", help="fusion recipe YAML file")
    fuse.add_argument(
        "--out", help="bundle directory (default: the recipe's dir, else exported/<name>)"
    )
    fuse.add_argument("--png", help="also draw the fused DAG (ops coloured by model) to this PNG")
    fuse.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    fuse.add_argument("--trust-pickle", action="store_true", help="allow pickle checkpoints")
    fuse.add_argument("--quiet", action="store_true", help="no stage messages")

    run = sub.add_parser(
        "run",
        help="run a bundle: generate from a prompt (decoders) or embed texts (encoders)",
        description="Run an exported bundle with recast's runtime (onnxruntime; no torch "
        "needed for ONNX bundles). The bundle's checksums are verified first.",
    )
    run.add_argument("bundle", help="bundle directory (made by `recast export`)")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue (decoder bundles)")
    what.add_argument("--text", action="append", help="text to embed (encoder bundles; repeatable)")
    what.add_argument("--inputs", metavar="NPZ", help="fused bundles: named input arrays (.npz)")
    what.add_argument(
        "--example", action="store_true", help="fused bundles: run on random example inputs"
    )
    run.add_argument(
        "--models", help="fused bundles: comma-separated models to run (only their work is done)"
    )
    run.add_argument("--save", metavar="NPZ", help="fused bundles: write the outputs to this .npz")
    run.add_argument("--overwrite", action="store_true", help="replace an existing --save file")
    run.add_argument("--max-new-tokens", type=non_negative_int, default=32)
    run.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--temperature", type=positive_float, default=1.0)
    run.add_argument("--top-p", type=probability, default=1.0)
    run.add_argument("--seed", type=non_negative_int, help="sampling seed")
    run.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    run.add_argument(
        "--cache",
        type=positive_int,
        metavar="N",
        help="offload bundles: keep at most N experts in memory",
    )
    run.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="offload bundles: memory for the model, e.g. 300MB (KB, MB, GB: powers of 1024); "
        "what the resident weights leave sets how many experts stay cached",
    )
    run.add_argument(
        "--policy",
        choices=["lru", "lfu", "belady"],
        default="lru",
        help="offload bundles: expert eviction policy",
    )
    run.add_argument(
        "--no-prefetch",
        action="store_true",
        help="offload bundles: read each missed expert when it is needed, not ahead",
    )
    run.add_argument("--expect-sha256", metavar="HEX", help=EXPECT_SHA256_HELP)
    run.add_argument("--json", action="store_true", help="print JSON")

    bench = sub.add_parser(
        "bench",
        help="prefill latency percentiles and decode tokens/s of one or more bundles",
        description="Time bundles side by side with recast's runtime; the first bundle is "
        "the baseline of the speedup column.",
    )
    bench.add_argument("bundles", nargs="+", help="bundle directories")
    bench.add_argument("--batch", type=positive_int, default=1)
    bench.add_argument("--length", type=positive_int, default=64, help="prompt tokens")
    bench.add_argument(
        "--new-tokens", type=non_negative_int, default=32, help="decoded tokens (decoders)"
    )
    bench.add_argument("--repeat", type=positive_int, default=20)
    bench.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads")
    bench.add_argument("--device", choices=["cpu", "cuda"])
    bench.add_argument("--json", action="store_true", help="print JSON")

    trace = sub.add_parser(
        "trace",
        help="record a pre-gating bundle's routing on built-in text as a trace file",
        description="Route English text (Python's pydoc topics) through a pre-gating bundle's "
        "router and write the experts each step uses, per layer, as a recast-trace JSON file "
        "for `recast simulate`. Docs: docs/export.md.",
    )
    trace.add_argument("bundle", help="a pre-gating bundle directory")
    trace.add_argument("--out", required=True, help="trace file to write")
    trace.add_argument("--overwrite", action="store_true", help="replace an existing trace file")
    trace.add_argument("--sequences", type=positive_int, default=32, help="sequences of text")
    trace.add_argument("--length", type=positive_int, default=64, help="tokens per sequence")
    trace.add_argument("--batch", type=positive_int, default=8, help="sequences decoded together")
    trace.add_argument(
        "--prefill", action="store_true", help="one step per batch (default: one per token)"
    )

    simulate = sub.add_parser(
        "simulate",
        help="replay a routing trace through expert caches: hit rate per policy and size",
        description="Replay a recast-trace file through an expert cache for each policy and "
        "capacity (in experts) and print hit rates, misses and bytes loaded; Belady's "
        "policy (which knows the future) bounds the others.",
    )
    simulate.add_argument("trace_file", metavar="trace", help="a recast-trace JSON file")
    simulate.add_argument(
        "--policy", default="lru,lfu,belady", help="comma-separated policies (lru, lfu, belady)"
    )
    simulate.add_argument(
        "--cache",
        default=None,
        help="comma-separated capacities in experts (default: 1/8, 1/4, 1/2 and 3/4 of all)",
    )
    simulate.add_argument("--png", help="write a chart of hit rate against cache size")
    simulate.add_argument("--overwrite", action="store_true", help="replace an existing --png")
    simulate.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _convert(args) -> int:
    from .pipeline import convert
    from .recipe import load_recipe

    if args.dry_run:
        print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
        return 0
    if not args.quiet and os.environ.get("RANK", "0") == "0":  # under a launcher: once, by rank 0
        logging.basicConfig(level=logging.INFO, format="recast: %(message)s", stream=sys.stderr)
    result = convert(
        args.recipe,
        out=args.out,
        overrides=args.overrides,
        overwrite=args.overwrite,
        trust_pickle=args.trust_pickle,
        resume=args.resume,
        progress=not args.quiet,
    )
    if result.output_dir is not None:  # the main process, under a multi-process launch
        print(result.report.table())
        print(f"\nsaved to {result.output_dir}")
        if result.bundle_dir is not None:
            print(f"bundle (parity checked) in {result.bundle_dir}")
    return 0


def _validate(args) -> int:
    from .fusion import FusionRecipe
    from .recipe import Recipe, read_mapping, validated

    for path in args.recipes:
        data, origin, text = read_mapping(path, "name, model, experts")
        if "models" in data:  # a fusion recipe
            fusion = validated(FusionRecipe, data, origin, text)
            print(f"{path}: ok ({fusion.name}: fuses {', '.join(fusion.models)})")
            continue
        recipe = validated(Recipe, data, origin, text)
        print(
            f"{path}: ok ({recipe.name}: {recipe.experts.count} experts, {recipe.experts.strategy})"
        )
    return 0


def _inspect(args) -> int:
    from .inspect import describe, format_description
    from .runtime.manifest import MANIFEST, read_manifest, summary

    if (Path(args.path) / MANIFEST).is_file():  # a bundle: its manifest, checksums verified
        manifest = read_manifest(Path(args.path), expect_sha256=args.expect_sha256)
        print(json.dumps(manifest, indent=2) if args.json else summary(Path(args.path), manifest))
        return 0

    description = describe(Path(args.path), trust_pickle=args.trust_pickle)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0


def _export(args) -> int:
    from .export import export

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="recast: %(message)s", stream=sys.stderr)
    spec = dict(
        format=args.format,
        target=args.target,
        quantize=_quantize_setting(args),
        moe_op=args.moe_op,
        compile=args.compile,
        offload=args.offload,
    )
    out = export(
        args.model, args.out, spec, overwrite=args.overwrite, trust_pickle=args.trust_pickle
    )
    from .runtime.manifest import pin_line, read_manifest

    manifest = read_manifest(out, verify=False)
    parity = manifest["parity"]
    size = sum(f["size"] for f in manifest["files"].values()) / 2**20
    print(
        f"{out}: {manifest['kind']} {manifest['artifact']} bundle, {manifest['precision']}, "
        f"{size:.1f} MiB; parity {parity['metric']} {parity['max_error']:.2e} "
        f"(tolerance {parity['tolerance']:g}) over {len(parity['cases'])} cases"
    )
    print(pin_line(out))
    return 0


def _quantize_setting(args):
    from .errors import RecipeError

    if args.quantize and args.expert_budget_mb is not None:
        raise RecipeError("give --quantize int8 or --expert-budget-mb, not both")
    if args.expert_budget_mb is not None:  # 0 too: the schema refuses it (it is not "none")
        return {"experts": {"budget_mb": args.expert_budget_mb}}
    return args.quantize


def _fuse(args) -> int:
    from .fusion import fuse, load_fusion_recipe
    from .runtime.fused import describe
    from .runtime.manifest import read_manifest

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="recast: %(message)s", stream=sys.stderr)
    recipe = load_fusion_recipe(args.recipe)
    out = fuse(
        recipe.entries(),
        args.out or recipe.out,
        shared_inputs=recipe.shared_inputs,
        target=recipe.target,
        skip=recipe.skip,
        overwrite=args.overwrite,
        png=args.png,
        trust_pickle=args.trust_pickle,
    )
    manifest = read_manifest(out, verify=False)
    parity = manifest["parity"]
    print(
        f"{out}: fused bundle of {', '.join(manifest['fusion']['models'])}; parity "
        f"{parity['metric']} {parity['max_error']:.2e} (tolerance {parity['tolerance']:g})"
    )
    print("\n".join(describe(manifest["fusion"])))
    return 0


def _run_fused(session, args) -> int:
    from .atomic import atomic_file, check_file
    from .errors import RuntimeInputError
    from .runtime.fused import example_feeds

    fusion = session.manifest["fusion"]
    if args.example:
        feeds = example_feeds(fusion["inputs"], fusion["dims"])
    else:
        try:
            with np.load(args.inputs) as data:
                feeds = {name: data[name] for name in data.files}
        except (OSError, ValueError) as exc:
            raise RuntimeInputError(f"cannot read inputs {args.inputs}: {exc}") from exc
    models = args.models.split(",") if args.models else None
    if args.save:
        check_file(args.save, args.overwrite)  # before the run
    outputs = session.run(feeds, models=models)
    if args.save:
        # into an open file: given a name, numpy would append .npz to it (and to the temp's)
        with atomic_file(args.save, args.overwrite) as temp, open(temp, "wb") as file:
            np.savez(file, **outputs)
    if args.json:
        print(json.dumps({name: value.tolist() for name, value in outputs.items()}))
        return 0
    for name, value in outputs.items():
        head = " ".join(f"{v:+.3f}" for v in value.ravel()[:4].astype(float))
        print(f"{name}: {value.dtype} {list(value.shape)} [{head} ...]")
    return 0


def _run(args) -> int:
    from .errors import RuntimeInputError
    from .runtime import load

    fused_only = args.inputs is not None or args.example or args.models or args.save
    session = load(
        args.bundle,
        device=args.device,
        cache=args.cache,
        memory_budget=args.memory_budget,
        policy=args.policy,
        prefetch=not args.no_prefetch,
        expect_sha256=args.expect_sha256,
    )
    if session.kind == "fused":
        if not (args.inputs is not None or args.example):
            raise RuntimeInputError("a fused bundle runs on --inputs FILE.npz or --example")
        return _run_fused(session, args)
    if fused_only:
        raise RuntimeInputError("--inputs, --example, --models and --save are for fused bundles")
    if args.prompt is not None:
        text = session.generate(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
        result = {"prompt": args.prompt, "completion": text}
        if session.experts is not None:
            result["expert_cache"] = session.stats()
        print(json.dumps(result) if args.json else text)
        if session.experts is not None and not args.json:
            stats = session.stats()
            print(
                f"experts: {stats['capacity']} cached ({args.policy}), hit rate "
                f"{stats['hit_rate']:.2f}, {stats['bytes_loaded'] / 2**20:.1f} MiB loaded, peak "
                f"{stats['peak_resident_bytes'] / 2**20:.1f} MiB resident",
                file=sys.stderr,
            )
        return 0
    vectors = session.embed(args.text)
    if args.json:
        print(json.dumps({"texts": args.text, "embeddings": vectors.tolist()}))
    else:
        for text, vector in zip(args.text, vectors, strict=True):
            head = " ".join(f"{v:+.3f}" for v in vector[:6])
            print(f"{text[:40]!r}: [{head} ...] ({len(vector)} dims)")
        if len(args.text) > 1:
            print("cosine similarities:\n" + str(np.round(vectors @ vectors.T, 3)))
    return 0


def _bench(args) -> int:
    from .runtime import load
    from .runtime.bench import measure

    rows = []
    for bundle in args.bundles:
        session = load(bundle, device=args.device, threads=args.threads)
        result = measure(session, args.batch, args.length, args.new_tokens, args.repeat)
        parity = session.manifest["parity"]
        rows.append(
            {
                "bundle": bundle,
                "precision": session.manifest["precision"],
                "parity_error": parity["max_error"],
                **result,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    base = rows[0]["prefill"]["p50_ms"]
    print(
        f"{'bundle':<32} {'precision':>9} {'parity':>9} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'speedup':>8} {'decode tok/s':>13}"
    )
    for row in rows:
        p = row["prefill"]
        decode = row.get("decode_tokens_per_s")
        print(
            f"{row['bundle'][-32:]:<32} {row['precision']:>9} {row['parity_error']:>9.1e} "
            f"{p['p50_ms']:>8.2f} {p['p95_ms']:>8.2f} {p['p99_ms']:>8.2f} "
            f"{base / p['p50_ms']:>7.2f}x {'-' if decode is None else f'{decode:.1f}':>13}"
        )
    print(f"(batch {rows[0]['batch']} x {rows[0]['length']} tokens; speedup vs the first bundle)")
    return 0


def _trace(args) -> int:
    from .atomic import check_file
    from .runtime import load
    from .runtime.simulate import builtin_batches, trace_from_routes

    check_file(args.out, args.overwrite)  # before the routing work
    session = load(args.bundle, device="cpu")
    batches = builtin_batches(session, args.sequences, args.length, args.batch)
    trace = trace_from_routes(session, batches, decode=not args.prefill)
    trace.save(args.out, overwrite=args.overwrite)
    print(
        f"{args.out}: {len(trace.steps)} steps, {trace.layers} layers x {trace.experts} experts, "
        f"{trace.unique_per_step():.1f} distinct experts per step"
    )
    return 0


def _simulate(args) -> int:
    from .atomic import check_file
    from .errors import TraceError
    from .runtime.simulate import Trace, simulate

    if args.png:
        check_file(args.png, args.overwrite, suffix=".png")  # before the simulation
    trace = Trace.load(args.trace_file)
    total = trace.layers * trace.experts
    try:
        capacities = (
            [int(c) for c in args.cache.split(",")]
            if args.cache
            else sorted({max(1, total * n // 8) for n in (1, 2, 4, 6)})
        )
    except ValueError:
        raise TraceError(f"--cache takes comma-separated integers, got {args.cache!r}") from None
    results = [
        simulate(trace, policy.strip(), capacity)
        for policy in args.policy.split(",")
        for capacity in capacities
    ]
    rows = [
        {
            "policy": r.policy,
            "capacity": r.capacity,
            "hit_rate": r.hit_rate,
            "hits": r.hits,
            "misses": r.misses,
            "bytes_loaded": r.bytes_loaded,
        }
        for r in results
    ]
    if args.png:
        _hit_rate_chart(rows, total, args.png, args.overwrite)
    if args.json:
        print(json.dumps({"unique_experts_per_step": trace.unique_per_step(), "results": rows}))
        return 0
    print(f"{'policy':<8} {'cache':>6} {'hit rate':>9} {'misses':>8} {'MiB loaded':>11}")
    for row in rows:
        loaded = "-" if row["bytes_loaded"] is None else f"{row['bytes_loaded'] / 2**20:.1f}"
        print(
            f"{row['policy']:<8} {row['capacity']:>6} {row['hit_rate']:>9.3f} "
            f"{row['misses']:>8} {loaded:>11}"
        )
    print(
        f"({len(trace.steps)} steps, {trace.layers} layers x {trace.experts} experts = {total}; "
        f"{trace.unique_per_step():.1f} distinct experts per step)"
    )
    return 0


def _hit_rate_chart(rows: list[dict], total: int, path: str, overwrite: bool) -> None:
    from .atomic import atomic_file
    from .errors import TraceError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TraceError("--png needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        ax.plot([r["capacity"] for r in mine], [r["hit_rate"] for r in mine], "o-", label=policy)
    ax.set_xlabel(f"cache capacity (experts, of {total})")
    ax.set_ylabel("hit rate")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, overwrite, suffix=".png") as temp:
        fig.savefig(temp, dpi=120)  # a PNG: the temp's name ends in .png too


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .errors import RecastError, ReportedElsewhereError

    if args.command not in ("run", "bench", "trace", "simulate"):  # these run without torch
        import transformers

        # recast reports its own stages; transformers' per-file bars would only add noise.
        transformers.utils.logging.disable_progress_bar()
    commands = {
        "convert": _convert,
        "validate": _validate,
        "inspect": _inspect,
        "export": _export,
        "fuse": _fuse,
        "run": _run,
        "bench": _bench,
        "trace": _trace,
        "simulate": _simulate,
    }
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if on_main_thread else None
    try:
        return commands[args.command](args)
    except RecastError as exc:
        if args.debug:
            raise
        if not isinstance(exc, ReportedElsewhereError):  # the main process prints that one
            print(f"recast: error: {exc}", file=sys.stderr)
        if previous is not None and getattr(exc, "shared", False):
            # What `finally` installs. Every process of a multi-process run exits 2 now, and
            # torchrun's SIGTERM to the rest, sent once one has exited, must not kill them first.
            previous = signal.SIG_IGN
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("recast: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure recast should have named: say so, in one line
        if args.debug:
            raise
        first_line = next(iter(str(exc).splitlines()), "")
        print(
            f"recast: internal error: {type(exc).__name__}: {first_line} (a bug in recast: "
            f"rerun with --debug and report the traceback)",
            file=sys.stderr,
        )
        return EXIT_BUG
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    # as an exception, so that staging directories are removed on the way out
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    raise SystemExit(main())
