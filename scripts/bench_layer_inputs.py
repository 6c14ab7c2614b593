"""What a streamed conversion should calibrate each layer on: the converted layers' outputs
(`stream.layer_inputs: moe`, what the MoE really feeds the layer, as CMoE and GPTQ do) or the
dense model's (`dense`, what a whole-model conversion sees).

Real weights only: all-MiniLM-L6-v2 (`recipes/bert-minilm.yaml`: 16 experts, top-4, layer
gates) and, when `python scripts/train_tiny_lm.py` has written it, the trained tiny LM
(`recipes/llama-tiny.yaml`, with layer gates in place of its pre-gating router, which is
not streamed). Recovery is off. Each recipe runs three ways in fresh processes: whole-model (the
baseline), streamed with dense layer inputs (which must equal the baseline), and streamed with
MoE layer inputs; the table gives each one's fidelity to the dense model and its time.

    python scripts/bench_layer_inputs.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import _bench

# name -> (recipe, the fidelity metrics shown, overrides: every run uses layer gates)
RECIPES = {
    "minilm": ("recipes/bert-minilm.yaml", ("cosine_mean", "similarity_spearman"), []),
    "tiny-lm": (
        "recipes/llama-tiny.yaml",
        ("perplexity_ratio", "top1_agreement", "mean_kl"),
        ["router.kind=layer"],
    ),
}
MODES = {
    "whole-model": {"stream.enabled": False},
    "streamed, dense inputs": {"stream.enabled": True, "stream.layer_inputs": "dense"},
    "streamed, MoE inputs": {"stream.enabled": True, "stream.layer_inputs": "moe"},
}

CONVERT = """
import json, time
import recast
p = _bench.params()
started = time.perf_counter()
result = recast.convert(p["recipe"], out=p["out"], overrides=p["overrides"], progress=False)
_bench.emit({"seconds": time.perf_counter() - started, "peak_rss": _bench.peak_rss_bytes(),
             "metrics": result.report.metrics, "recall": result.report.routing.get("mean_recall")})
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", default=str(_bench.REPO / "exported/bench/bench_layer_inputs.json")
    )
    args = parser.parse_args()
    rows, results = [], {}
    for name, (path, keys, extra) in RECIPES.items():
        if name == "tiny-lm" and not (_bench.REPO / "exported" / "tiny-lm").exists():
            print("tiny-lm: skipped (run python scripts/train_tiny_lm.py first)", file=sys.stderr)
            continue
        for mode, settings in MODES.items():
            with tempfile.TemporaryDirectory() as work:
                overrides = [f"{k}={str(v).lower()}" for k, v in settings.items()]
                overrides += ["recover.steps=0", "export=null", *extra]
                run = _bench.run_snippet(
                    CONVERT, {"recipe": path, "out": f"{work}/out", "overrides": overrides}
                )
            results.setdefault(name, {})[mode] = run
            metrics = run["metrics"]
            rows.append(
                [
                    name,
                    mode,
                    ", ".join(f"{k} {metrics[k]:.4f}" for k in keys),
                    f"{run['recall']:.3f}",
                    f"{run['seconds']:.0f}",
                    _bench.mb(run["peak_rss"]),
                ]
            )
    print(_bench.machine_line(_bench.machine()))
    headers = ["model", "calibrated on", "fidelity to the dense model", "router recall", "s"]
    print(_bench.format_table([*headers, "peak MiB"], rows, "lllrrr"))
    _bench.write_json(
        args.json, {"date": _bench.today(), "machine": _bench.machine(), "results": results}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
