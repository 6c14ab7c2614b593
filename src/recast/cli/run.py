"""`recast run`: generate (decoders), embed (encoders) or run a fused bundle."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import RuntimeInputError
from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run",
        parents=[
            common.overwrite("an existing --save file"),
            common.device("default: cuda when present"),
            common.expect_sha256(),
            common.json_output(),
        ],
        help="run a bundle: generate from a prompt (decoders) or embed texts (encoders)",
        description="Run an exported bundle with recast's runtime (onnxruntime; no torch "
        "needed for ONNX bundles). The bundle's checksums are verified first.",
    )
    parser.add_argument("bundle", help="bundle directory (made by `recast export`)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue (decoder bundles)")
    what.add_argument("--text", action="append", help="text to embed (encoder bundles; repeatable)")
    what.add_argument("--inputs", metavar="NPZ", help="fused bundles: named input arrays (.npz)")
    what.add_argument(
        "--example", action="store_true", help="fused bundles: run on random example inputs"
    )
    parser.add_argument(
        "--models", help="fused bundles: comma-separated models to run (only their work is done)"
    )
    parser.add_argument(
        "--save", metavar="NPZ", help="fused bundles: write the outputs to this .npz"
    )
    parser.add_argument("--max-new-tokens", type=common.non_negative_int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=common.positive_float, default=1.0)
    parser.add_argument("--top-p", type=common.probability, default=1.0)
    parser.add_argument("--seed", type=common.non_negative_int, help="sampling seed")
    parser.add_argument(
        "--cache",
        type=common.positive_int,
        metavar="N",
        help="offload bundles: keep at most N experts in memory",
    )
    parser.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="offload bundles: memory for the model, e.g. 300MB (KB, MB, GB: powers of 1024); "
        "what the resident weights leave sets how many experts stay cached",
    )
    parser.add_argument(
        "--policy",
        choices=["lru", "lfu", "belady"],
        default="lru",
        help="offload bundles: expert eviction policy",
    )
    parser.add_argument(
        "--no-prefetch",
        action="store_true",
        help="offload bundles: read each missed expert when it is needed, not ahead",
    )
    return parser


def run(args) -> int:
    from ..runtime import load

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
        return _generate(session, args)
    return _embed(session, args)


def _generate(session, args) -> int:
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


def _embed(session, args) -> int:
    import numpy as np

    vectors = session.embed(args.text)
    if args.json:
        print(json.dumps({"texts": args.text, "embeddings": vectors.tolist()}))
        return 0
    for text, vector in zip(args.text, vectors, strict=True):
        head = " ".join(f"{v:+.3f}" for v in vector[:6])
        print(f"{text[:40]!r}: [{head} ...] ({len(vector)} dims)")
    if len(args.text) > 1:
        print("cosine similarities:\n" + str(np.round(vectors @ vectors.T, 3)))
    return 0


def _run_fused(session, args) -> int:
    import numpy as np

    from ..atomic import atomic_file, check_file
    from ..runtime.fused import example_feeds

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
