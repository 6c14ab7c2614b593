"""Export at the sizes people have: a bundle past protobuf's 2 GB, and the memory it takes.

The random-weight Llama checkpoint of `bench_scale.py` (0.5B by default: 0.65B parameters,
2.6 GB in fp32, so the graph's weights must be external data) is converted with that script's
recipe (streamed, bf16 output) and exported with `recast export` in a fresh process: time,
peak RSS against the fp32 model's size, bundle size and the parity record (tokens checked,
whether the big-model bound ended the coverage batches, largest error). Side by side in the
same run:

- the peer a user would write instead: the dense checkpoint loaded in fp32 and exported with
  `torch.onnx.export(dynamo=True)`, saved with external data (no parity check, no bundle);
- `recast export` of the dense checkpoint;
- re-saving the exported graph the way recast did before (onnx.load with its data, then
  onnx.save) against the way it does now (onnx_ir, one memory-mapped tensor at a time).

    python scripts/bench_export_scale.py --size 0.5B
"""

from __future__ import annotations

import argparse
import shutil
import sys

import _bench
import bench_scale

GIB = 1 << 30

EXPORT = """
import json, time
from pathlib import Path
import recast
p = _bench.params()
started = time.perf_counter()
out = recast.export(p["source"], p["out"], overwrite=True)
seconds = time.perf_counter() - started
manifest = json.loads((out / "manifest.json").read_text())
parity = manifest["parity"]
_bench.emit({"seconds": seconds, "peak_rss": _bench.peak_rss_bytes(),
             "bundle_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
             "graph_bytes": (out / "model.onnx.data").stat().st_size,
             "parity": {k: parity.get(k) for k in ("max_error", "tokens", "coverage_bounded",
                                                      "experts_exercised", "tolerance")},
             "cases": len(parity["cases"])})
"""

PEER = """
import time, torch, transformers
p = _bench.params()
started = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(p["checkpoint"], dtype=torch.float32).eval()
model.config.use_cache = False  # logits only: a DynamicCache output does not export
ids = torch.randint(4, 4000, (2, 16))
batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
program = torch.onnx.export(
    model, (ids,), input_names=["input_ids"], output_names=["logits"],
    dynamic_shapes=({0: batch, 1: length},), dynamo=True, opset_version=18,
)
program.save(p["out"], external_data=True)
_bench.emit({"seconds": time.perf_counter() - started, "peak_rss": _bench.peak_rss_bytes()})
"""

RESAVE = """
import time
from pathlib import Path
p = _bench.params()
source, target = Path(p["source"]), Path(p["target"])
started = time.perf_counter()
if p["how"] == "onnx.load + onnx.save":
    import onnx
    onnx.save(onnx.load(str(source)), str(target), save_as_external_data=True,
              location=target.name + ".data", size_threshold=1024)
else:
    from recast.export.portable import save_graph
    save_graph(source, target)
_bench.emit({"seconds": time.perf_counter() - started, "peak_rss": _bench.peak_rss_bytes()})
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.5B", choices=list(bench_scale.SHAPES))
    parser.add_argument(
        "--json", default=str(bench_scale.ROOT / "bench_export_scale.json"), help="results"
    )
    parser.add_argument("--keep", action="store_true", help="keep the bundles")
    args = parser.parse_args()
    shape = bench_scale.SHAPES[args.size]
    root = bench_scale.ROOT
    root.mkdir(parents=True, exist_ok=True)
    checkpoint, moe = root / f"llama-{args.size}", root / f"moe-{args.size}"
    if not checkpoint.exists():
        _bench.run_snippet(
            bench_scale.MAKE_CHECKPOINT,
            {"dir": str(checkpoint), "shape": shape, "vocab": bench_scale.VOCAB},
        )
    if not moe.exists():
        recipe = bench_scale.recipe(f"scale-{args.size}", checkpoint, 16, 128, enabled=True)
        _bench.run_snippet(bench_scale.CONVERT, {"recipe": recipe, "out": str(moe)})
    params = bench_scale.parameter_count(shape)
    fp32 = 4 * params
    results = {"size": args.size, "params": params, "fp32_bytes": fp32}
    bundles = {"moe": root / f"bundle-moe-{args.size}", "dense": root / f"bundle-dense-{args.size}"}
    results["recast_moe"] = _bench.run_snippet(
        EXPORT, {"source": str(moe), "out": str(bundles["moe"])}
    )
    results["recast_dense"] = _bench.run_snippet(
        EXPORT, {"source": str(checkpoint), "out": str(bundles["dense"])}
    )
    peer_dir = root / f"peer-{args.size}"
    shutil.rmtree(peer_dir, ignore_errors=True)
    peer_dir.mkdir()
    results["torch_onnx_dense"] = _bench.run_snippet(
        PEER, {"checkpoint": str(checkpoint), "out": str(peer_dir / "model.onnx")}
    )
    results["resave"] = {}
    for how in ("onnx.load + onnx.save", "onnx_ir (recast)"):
        target = peer_dir / "resaved.onnx"
        results["resave"][how] = _bench.run_snippet(
            RESAVE,
            {"source": str(bundles["moe"] / "model.onnx"), "target": str(target), "how": how},
        )
        target.unlink()
        (peer_dir / "resaved.onnx.data").unlink()
    rows = []
    for name, label in (
        ("recast_moe", "recast export, MoE (parity-gated bundle)"),
        ("recast_dense", "recast export, dense (parity-gated bundle)"),
        ("torch_onnx_dense", "torch.onnx.export by hand, dense (no gate)"),
    ):
        r = results[name]
        parity = r.get("parity") or {}
        rows.append(
            [
                label,
                f"{r['seconds']:.0f}",
                f"{r['peak_rss'] / GIB:.2f}",
                f"{r['peak_rss'] / fp32:.2f}",
                f"{r['graph_bytes'] / GIB:.2f}" if "graph_bytes" in r else "-",
                parity.get("tokens", "-"),
                f"{parity['max_error']:.1e}" if parity else "-",
                parity.get("coverage_bounded", "-"),
            ]
        )
    for how, r in results["resave"].items():
        rows.append(
            [
                f"re-save the MoE graph: {how}",
                f"{r['seconds']:.0f}",
                f"{r['peak_rss'] / GIB:.2f}",
                f"{r['peak_rss'] / fp32:.2f}",
                *["-"] * 4,
            ]
        )
    print(_bench.machine_line(_bench.machine()))
    print(
        f"{args.size}: {params / 1e9:.2f}B parameters, {fp32 / GIB:.2f} GiB in fp32; "
        f"peak / fp32 is the memory multiple"
    )
    print(
        _bench.format_table(
            [
                "run",
                "s",
                "peak GiB",
                "peak / fp32",
                "weights GiB",
                "parity tokens",
                "max error",
                "bounded",
            ],
            rows,
        )
    )
    _bench.write_json(args.json, {"date": _bench.today(), "machine": _bench.machine(), **results})
    if not args.keep:
        for path in (*bundles.values(), peer_dir):
            shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
